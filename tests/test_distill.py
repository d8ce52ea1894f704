"""Knowledge distillation (Hinton et al. 2015): the T²-scaled soft-target gradient, the hard/soft weighting in
the training loop, and the pipeline's teacher (the model before compression)."""

import pytest
import torch

import netsurgeon as ns
from netsurgeon.distill import Distillation, distillation_loss
from netsurgeon.pipeline import Pipeline


def test_soft_target_gradient_is_t_times_q_minus_p():
    torch.manual_seed(0)
    z = torch.randn(4, 10, requires_grad=True)
    v = torch.randn(4, 10)
    t = 5.0
    distillation_loss(z, v, t).backward()
    q, p = torch.softmax(z.detach() / t, 1), torch.softmax(v / t, 1)
    torch.testing.assert_close(z.grad, t * (q - p) / 4)          # T² · (1/T)(q − p), batch mean (Eq. (2))
    assert float(distillation_loss(v, v, t)) == pytest.approx(0.0, abs=1e-6)


def test_training_weights_hard_and_soft_terms(digits):
    torch.manual_seed(0)
    teacher = ns.build_model("lenet300", digits.input_shape)
    ns.train(teacher, digits, ns.TrainConfig(epochs=3, lr=0.05))
    student = ns.build_model("lenet300", digits.input_shape)
    cb = Distillation(teacher, temperature=4.0, alpha=1.0)           # soft targets only: labels ignored
    assert cb.hard_loss_weight == 0.0
    shuffled = ns.data.Dataset("d", ns.data.Split(digits.train.x, digits.train.y[torch.randperm(len(digits.train))]),
                               digits.val, digits.test, num_classes=10)
    ns.train(student, shuffled, ns.TrainConfig(epochs=3, lr=0.05), callbacks=[cb])
    acc = ns.evaluate(student, digits.test)[1]
    assert acc > 0.8                                                  # learned from the teacher, not the wrong labels
    with pytest.raises(ValueError, match="temperature > 0 and alpha in"):
        Distillation(teacher, temperature=0)


def test_pipeline_teacher_is_the_model_before_compression(digits):
    torch.manual_seed(0)
    model = ns.build_model("lenet300", digits.input_shape)
    ns.train(model, digits, ns.TrainConfig(epochs=2, lr=0.05))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = Pipeline.from_spec(["magnitude", "distill"], ["sparsity=0.9", "1.epochs=0", "2.epochs=1", "2.lr=0.01"])
    seen = {}
    from netsurgeon import distill as mod

    original = mod.Distillation.__init__

    def spy(self, teacher, *a, **k):
        seen["teacher"] = {k2: v.clone() for k2, v in teacher.state_dict().items()}
        original(self, teacher, *a, **k)

    mod.Distillation.__init__ = spy
    try:
        pipe.run(model, digits)
    finally:
        mod.Distillation.__init__ = original
    assert all(torch.equal(seen["teacher"][k], before[k]) for k in before)     # the dense model, not the pruned one
    kept = sum(int((m.weight != 0).sum()) for m in (model.fc1, model.fc2, model.fc3))
    assert kept <= 0.1 * sum(m.weight.numel() for m in (model.fc1, model.fc2, model.fc3)) + 1   # masks stayed


def test_language_model_logits_are_distilled_per_token():
    """(B, T, V) logits: the softmax is over the vocabulary and the mean over the B·T next-token predictions,
    the same number as the flattened (B·T, V) classifier form (not a softmax over the T positions)."""
    torch.manual_seed(0)
    z, v = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    flat = distillation_loss(z.reshape(10, 7), v.reshape(10, 7), 2.0)
    torch.testing.assert_close(distillation_loss(z, v, 2.0), flat)
    assert float(distillation_loss(v, v, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_pipeline_distills_a_given_teacher_into_a_smaller_student():
    torch.manual_seed(0)
    x = torch.randint(0, 16, (24, 8))
    data = ns.data.Dataset("lm", ns.data.Split(x, x.roll(-1, 1)), ns.data.Split(x[:4], x[:4].roll(-1, 1)),
                           ns.data.Split(x[:4], x[:4].roll(-1, 1)), 16, metric="perplexity")
    teacher = ns.build_model("gpt", (8,), 16, n_layer=2, width=16, n_head=2)
    student = ns.build_model("gpt", (8,), 16, n_layer=1, width=16, n_head=2)
    runs = Pipeline.from_spec([{"distill": {"epochs": 1, "max_steps": 2, "batch_size": 8}}]).run(
        student, data, teacher=teacher)
    assert runs[0]["report"]["steps"] == 2 and len(student.blocks) == 1


def test_a_token_model_records_int64_inputs():
    """The zoo's GPT and any model a pipeline ran on token data record input_dtype int64, so FLOP counts, the
    runtime and summarize feed them token ids (its first parameter is the bare positional table, not the
    embedding, so the layer order alone would not tell)."""
    from netsurgeon.changes import arch_of, set_arch
    from netsurgeon.report import summarize

    m = ns.build_model("gpt", (8,), 16, n_layer=1, width=16, n_head=2)
    assert arch_of(m)["input_dtype"] == "int64"
    set_arch(m, {k: v for k, v in arch_of(m).items() if k != "input_dtype"})  # as an older file records it
    x = torch.randint(0, 16, (8, 8))
    data = ns.data.Dataset("lm", ns.data.Split(x, x.roll(-1, 1)), ns.data.Split(x[:2], x[:2].roll(-1, 1)),
                           ns.data.Split(x[:2], x[:2].roll(-1, 1)), 16, metric="perplexity")
    Pipeline.from_spec([{"int8": {}}]).run(m, data)
    assert arch_of(m)["input_dtype"] == "int64"
    assert summarize(m, (8,), data=data, batches=(1,), repeats=5)["test_perplexity"] > 1
