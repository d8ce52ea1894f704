"""The zoo's real-shaped models (issue 38's speed rows): torchvision's ResNet-18 and MobileNetV2 layouts (parameter
counts and names), GPT-2-small's FFN and a GPT-2-width decoder; shapes on small inputs so the test stays quick."""

import pytest
import torch

import netsurgeon as ns
from netsurgeon.models import arch_of, count_params


@pytest.mark.parametrize("name,params", [("resnet18", 11_689_512), ("mobilenetv2", 3_504_872),
                                         ("gpt2_ffn", 4_722_432), ("gpt2_decoder", 14_669_056)])
def test_parameter_counts_and_recorded_defaults(name, params):
    m = ns.build_model(name)
    assert count_params(m) == params  # torchvision's counts for the two CNNs at 1000 classes
    arch = arch_of(m)
    assert arch["name"] == name and arch["num_classes"] == {"gpt2_ffn": 768, "gpt2_decoder": 256}.get(name, 1000)


def test_resnet18_has_torchvisions_names_and_shapes():
    m = ns.build_model("resnet18", (3, 32, 32), 10).eval()
    sd = m.state_dict()
    assert len(sd) == 122
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(sd["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(sd["layer4.1.conv2.weight"].shape) == (512, 512, 3, 3)
    assert tuple(sd["fc.weight"].shape) == (10, 512)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_mobilenetv2_has_torchvisions_names_and_shapes():
    m = ns.build_model("mobilenetv2", (3, 32, 32), 10).eval()
    sd = m.state_dict()
    assert len(sd) == 314
    assert tuple(sd["features.0.0.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["features.1.conv.0.0.weight"].shape) == (32, 1, 3, 3)  # t = 1: depthwise first
    assert tuple(sd["features.2.conv.1.0.weight"].shape) == (96, 1, 3, 3)  # t = 6: 16 -> 96 expanded
    assert tuple(sd["features.18.0.weight"].shape) == (1280, 320, 1, 1)
    assert tuple(sd["classifier.1.weight"].shape) == (10, 1280)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_gpt2_shapes():
    ffn = ns.build_model("gpt2_ffn").eval()
    assert [tuple(p.shape) for n, p in ffn.named_parameters() if n.endswith("weight")] == [(3072, 768), (768, 3072)]
    dec = ns.build_model("gpt2_decoder", (16,), n_layer=1).eval()
    assert dec.blocks[0].attn.embed_dim == 768 and dec.blocks[0].attn.num_heads == 12
    with torch.no_grad():
        assert ffn(torch.randn(1, 768)).shape == (1, 768)
        assert dec(torch.randint(0, 256, (1, 16))).shape == (1, 16, 256)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="resnet18"):
        ns.build_model("resnet18", (3, 16, 16))
    with pytest.raises(ValueError, match="mobilenetv2"):
        ns.build_model("mobilenetv2", width_mult=0)
