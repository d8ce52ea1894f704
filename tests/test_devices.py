"""The model's own device (issue 36 item 5): ``--device`` / ``device=`` checked before any work, the model and
in-memory data placed once, loader batches moved as they come, files written from CPU copies. The CUDA cases
run where a GPU is present and skip elsewhere."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import netsurgeon as ns
from netsurgeon.cli import cli
from netsurgeon.data import batches
from netsurgeon.devices import parse_device, place, running_on

has_cuda = torch.cuda.is_available()
gpu = pytest.mark.gpu


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "cpu:0", "gpu"])
def test_a_device_that_is_not_one_is_refused_in_one_line_quoting_it(spec):
    with pytest.raises(ValueError, match=f"--device {spec!r}: expected cpu, cuda or cuda:N"):
        parse_device(spec)


@pytest.mark.skipif(has_cuda, reason="checks the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it_says_so():
    with pytest.raises(ValueError, match="sees no CUDA device"):
        parse_device("cuda")


def test_cpu_and_none_are_accepted():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(None) is None


@pytest.mark.parametrize("command", ["train", "compress", "compare"])
def test_cli_refuses_a_bad_device_before_any_work(tmp_path, command):
    base = tmp_path / "in.safetensors"
    base.write_bytes(b"x")  # never read: the device is checked first
    args = {"train": ["train", "--model", "lenet300", "-o", str(tmp_path / "o.safetensors")],
            "compress": ["compress", str(base), "--method", "magnitude", "-o", str(tmp_path / "o.nsz")],
            "compare": ["compare", str(base), "-o", str(tmp_path / "rep")]}[command]
    r = CliRunner().invoke(cli, [*args, "--device", "tpu"])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'tpu'" in lines[0], r.output
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.nsz").exists()
    assert not (tmp_path / "rep").exists()


def test_batches_follow_the_running_device_and_stay_put_outside_a_run():
    split = ns.data.Split(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))
    loader = [(torch.ones(2, 3), torch.zeros(2, dtype=torch.long))]
    with running_on(torch.device("meta")):  # any non-CPU device: the batches are moved there
        assert {x.device.type for x, _ in batches(split, 2)} == {"meta"}
        assert {y.device.type for _, y in batches(loader)} == {"meta"}
    assert {x.device.type for x, _ in batches(split, 2)} == {"cpu"}


def test_place_leaves_a_model_where_it_is_without_a_device():
    model = nn.Linear(3, 2)
    dev, data = place(model, None, None)
    assert dev == torch.device("cpu") and data is None


@gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["magnitude", "kmeans", "int8", "dns", "wanda", "sparsegpt", "gptq"])
def test_methods_run_on_the_gpu_and_the_file_is_the_same_kind(tmp_path, method):
    from netsurgeon.compress import compress_model
    from netsurgeon.modelfile import load_compressed
    from netsurgeon.pipeline import Pipeline

    torch.manual_seed(0)
    data = ns.data.digits()
    model = ns.models.build_model("lenet300", data.input_shape, 10)
    ns.train(model, data, ns.TrainConfig(epochs=1, max_steps=20), device="cuda")
    assert next(model.parameters()).is_cuda
    pipe = Pipeline.from_spec([method], ["max_steps=20"] if method in ("magnitude", "dns") else [])
    r = compress_model(model, pipe, data, tmp_path / "m.nsz", progress=False, device="cuda")
    assert next(r.model.parameters()).is_cuda  # left where it ran
    back = load_compressed(tmp_path / "m.nsz")
    x = data.test.x[:64]
    with torch.no_grad():
        assert torch.allclose(back(x), r.model(x.cuda()).cpu(), atol=1e-4)
