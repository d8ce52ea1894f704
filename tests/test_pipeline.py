"""Every registered method, on a non-paper model (small ResNet: BatchNorm, residual adds, 1x1 shortcuts) and on
LeNet-5: run as a pipeline stage, saved to .nsz, loaded back; the loaded module computes what the in-memory
model computes."""

import dataclasses
import json

import pytest
import torch

import netsurgeon as ns
from netsurgeon.data import Dataset, Split
from netsurgeon.pipeline import Pipeline, get_method, methods
from netsurgeon.registry import KINDS, MethodConfig

# Each method declares its quickest settings where it registers (`quick=`); every method runs with them.


def _random_data(shape, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(k):
        return Split(torch.randn(k, *shape, generator=g), torch.randint(0, 10, (k,), generator=g))

    return Dataset("random", split(n), split(32), split(32), num_classes=10)


class UserNet(torch.nn.Module):
    """Not built by netsurgeon: depthwise and grouped Conv2d, Conv1d, BatchNorm, a residual add."""

    def __init__(self, width=4):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, width, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(width)
        self.dw = torch.nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pw = torch.nn.Conv2d(width, width, 1, groups=2)
        self.seq = torch.nn.Conv1d(width, width, 3, padding=1)
        self.head = torch.nn.Linear(width * 64, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.pw(torch.relu(self.dw(h)))
        return self.head(torch.relu(self.seq(h.flatten(2))).flatten(1))


def _model(name):
    torch.manual_seed(0)
    if name == "user_net":
        return UserNet(), _random_data((1, 8, 8))
    if name == "resnet_small":
        return ns.build_model("resnet_small", (1, 8, 8), width=4, blocks=[1, 1]), _random_data((1, 8, 8))
    return ns.build_model("lenet5", (1, 28, 28)), _random_data((1, 28, 28))


def test_registry_every_method_has_config_citation_and_cli_entry(runner):
    from netsurgeon.cli import cli

    registered = methods()
    for name, m in registered.items():
        assert m.kind in KINDS
        assert issubclass(m.config, MethodConfig) and dataclasses.is_dataclass(m.config)
        assert m.config.__dataclass_params__.frozen
        assert m.config.owner == name, f"{name}: errors must name the method"
        assert len(m.citation) > 10 and len(m.summary) > 10
        cfg = m.make_config()   # the defaults are valid
        for row in m.config.describe():
            assert row["help"], f"{name}.{row['key']} has no help"
            assert row["key"] in cfg.to_dict()
        out = runner.invoke(cli, ["methods", name], terminal_width=200)
        assert out.exit_code == 0 and m.citation[:20] in out.output


def test_config_errors_name_method_key_range_and_value():
    with pytest.raises(ValueError, match=r"^dns: gamma must be a number >= 0; got -1\.$"):
        get_method("dns").make_config({"gamma": -1})
    with pytest.raises(ValueError, match=r"^kmeans: unknown key\(s\) \['bitz'\]; valid keys: bits, init, iters, seed"):
        get_method("kmeans").make_config({"bitz": 4})
    with pytest.raises(ValueError, match=r"woodfisher: block_size must be an integer >= 1 or null; got 'big'"):
        get_method("woodfisher").make_config({"block_size": "big"})
    with pytest.raises(ValueError, match=r"gradual: need start < end; got start=5, end=5"):
        get_method("gradual").make_config({"start": 5, "end": 5})
    assert get_method("woodtaylor").make_config().damp == 0.1 and get_method("woodfisher").make_config().damp == 1e-5


def test_overrides_resolve_by_key_stage_name_and_number():
    p = Pipeline.from_spec(["dns", "kmeans", "finetune"], ["c_rate={fc: 2, conv: 1}", "kmeans.bits=4", "3.lr=0.001",
                                                          "1.epochs=2", "value_dtype=float16"], {"seed": 7})
    assert [s.method for s in p.stages] == ["dns", "kmeans", "finetune", "encode"]
    assert p.stages[0].config.c_rate == {"fc": 2.0, "conv": 1.0} and p.stages[0].config.epochs == 2
    assert p.stages[1].config.bits == 4 and p.stages[2].config.lr == 0.001
    assert p.stages[0].config.seed == 7 and p.stages[2].config.seed == 7 and p.encode.value_dtype == "float16"
    with pytest.raises(ValueError, match="write one of 1.epochs \\(dns\\), 3.epochs \\(finetune\\)"):
        Pipeline.from_spec(["dns", "kmeans", "finetune"], ["epochs=3"])
    with pytest.raises(ValueError, match="2 stages are 'finetune'; name one by its number \\(1, 2\\)"):
        Pipeline.from_spec(["finetune", "finetune"], ["finetune.lr=0.1"])


def test_composition_is_checked_before_any_work():
    for stages, msg in ((["int8", "kmeans"], "stage 2 'kmeans' needs float weights, but stage 1 'int8' leaves int8"),
                        (["kmeans", "woodfisher"], "stage 2 'woodfisher' needs float weights"),
                        (["encode", "finetune"], "must be the last stage"),
                        (["qat", "finetune"], "stage 2 'finetune' needs float weights or .*k-means-shared")):
        with pytest.raises(ValueError, match=msg):
            Pipeline.from_spec(stages).check(has_data=True)
    with pytest.raises(ValueError, match="stage 1 'dns' needs data"):
        Pipeline.from_spec(["dns"]).check(has_data=False)
    Pipeline.from_spec(["magnitude"], ["epochs=0"]).check(has_data=False)  # prune only: no data needed
    for ok in (["dns", "kmeans", "finetune"], ["woodfisher", "int8"], ["autoprune", "kmeans"], ["l1", "qat"]):
        Pipeline.from_spec(ok).check(has_data=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    Pipeline.from_spec(["int8"]).run(model)
    with pytest.raises(ValueError, match="stage 1 'magnitude' needs float weights, but the input model leaves int8"):
        Pipeline.from_spec(["magnitude"], ["epochs=0"]).run(model)


@pytest.mark.parametrize("method,model_name", [
    # exact OBS on the user net differentiates its ~2,700 weights twice (~8 s), and LeNet-5's 431k weights make
    # every method slower (8 s in all) than on the two small nets: run with the slow cases
    pytest.param(m, n, marks=pytest.mark.slow) if (m, n) == ("obs", "user_net") or n == "lenet5" else (m, n)
    for n in ("resnet_small", "lenet5", "user_net") for m in sorted(methods())])
def test_every_method_compresses_saves_and_reloads_the_same_module(method, model_name, tmp_path):
    model, data = _model(model_name)
    stages = [method] if get_method(method).kind != "codec" else []
    quick = [f"{k}={json.dumps(v)}" for k, v in get_method(method).quick.items()]
    pipe = Pipeline.from_spec(stages or ["encode"], quick)
    if method == "slimming" and model_name == "lenet5":  # nothing to make sparse: refused, clearly
        with pytest.raises(ValueError, match="no BatchNorm layer"):
            pipe.run(model, data)
        return
    if method == "slimming" and model_name == "user_net":  # its BatchNorm's group reaches a grouped conv: refused
        with pytest.raises(ValueError, match="no removable channel group has a BatchNorm scale"):  # before training
            pipe.run(model, data)
        return
    if method == "heads":  # none of these models has attention: refused in one line, before any work
        with pytest.raises(ValueError, match="head pruning applies to attention only"):
            pipe.run(model, data)
        return
    if method == "ffn_neurons" and model_name != "lenet5":  # no Linear-activation-Linear block: refused in one line
        with pytest.raises(ValueError, match="the model has no feed-forward block"):
            pipe.run(model, data)
        return
    if method == "kfac":  # K-FAC covers the Linear layers; the convolutions stay as they are, listed as skipped
        rec = pipe.run(model, data)[0]
        convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
        assert convs and convs <= set(rec["skipped"]), rec["skipped"]
        assert all(int((model.get_submodule(c).weight == 0).sum()) == 0 for c in convs)
    if method == "datafree" and model_name != "lenet5":  # no hidden fully connected layer: refused, clearly
        with pytest.raises(ValueError, match="no hidden Linear layer"):
            pipe.run(model, data)
        return
    if method == "obs" and model_name == "lenet5":  # an exact Hessian of 431k weights: refused, clearly
        with pytest.raises(ValueError, match="exact OBS is limited to 4096 weights"):
            pipe.run(model, data)
        return
    if method in ("bnn", "xnor") and model_name != "lenet5":  # a binarized conv reads a functional relu's
        with pytest.raises(ValueError, match="binarizes its input, which has no negative value"):  # output:
            pipe.run(model, data)                                 # sign would be +1 everywhere, refused clearly
        return
    records = pipe.run(model, data)
    assert [r["method"] for r in records][-1] == "encode"
    model.eval()
    x = data.test.x[:8]
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "m.nsz"
    info = pipe.save(model, path)
    assert info.file_bytes == path.stat().st_size
    for keep in (False, True):
        fresh = UserNet() if model_name == "user_net" else None  # the file records no architecture for it
        loaded = ns.load_compressed(path, fresh, keep_codecs=keep)
        assert type(loaded) is type(model)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    form = get_method(method).output_form(pipe.stages[0].config) if stages else None
    if form is not None:  # the stored form is the method's: k-means codes or int8 values
        codecs = {r.codec for r in info.records if r.name.endswith("weight") and len(r.shape) > 1}
        if method in ("xnor", "hwgq", "hashednets", "pq", "binaryconnect", "bnn"):  # xnor, hwgq: the first and
            # last layers stay real; binaryconnect, bnn: the last (no BatchNorm after it); hashednets: fc only;
            # pq: a layer too small for its codebooks stays float
            assert form in codecs and (len(codecs) > 1 or method in ("hashednets", "pq"))
        else:
            assert codecs == {"shared" if form == "shared" else form}


def test_the_example_method_in_docs_design_registers_and_runs(digits):
    """docs/design.md shows how to add a method in about 30 lines; that code must work as written."""
    from pathlib import Path

    from netsurgeon.compare import suite
    from netsurgeon.registry import REGISTRY

    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    code = text.split("### Adding a method")[1].split("```python")[1].split("```")[0]
    assert 20 <= len(code.strip().splitlines()) <= 35
    assert "example_random" not in methods()  # a name no user method would take, and no built-in has
    try:
        exec(compile(code, "docs/design.md", "exec"), {"__name__": "example_method"})
        assert "example_random" in methods() and suite()["example_random"][0] == "pruning"
        torch.manual_seed(0)
        m = ns.build_model("lenet300", digits.input_shape)
        report = Pipeline.from_spec(["example_random"], ["sparsity=0.7"]).run(m, digits)
        assert abs(report[0]["report"]["kept"] - 0.3) < 0.02
        with pytest.raises(ValueError, match=r"example_random: sparsity must be a number in \[0, 1\); got 2"):
            Pipeline.from_spec(["example_random"], ["sparsity=2"])
    finally:
        REGISTRY.pop("example_random", None)
