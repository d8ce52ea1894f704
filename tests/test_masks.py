import pytest
import torch
from torch import nn

from netsurgeon.masks import (
    Mask,
    StraightThroughMask,
    attach_masks,
    attach_masks_for_state_dict,
    bake,
    effective_state_dict,
    get_masks,
    original,
    prunable_layers,
    sparsity_report,
)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _grads(straight_through: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))  # no ReLU: no unit is dead by chance
    masks = attach_masks(m, ["0.weight"], straight_through=straight_through)
    masks["0.weight"].mask[0, :2] = 0
    x = torch.arange(8.0).view(2, 4)
    m(x).sum().backward()
    return original(m, "0.weight").grad.clone(), masks["0.weight"].mask


def test_plain_mask_zeroes_gradient_of_pruned_weights():
    g, mask = _grads(straight_through=False)
    assert g[0, :2].tolist() == [0.0, 0.0]
    assert (g[mask.bool()] != 0).any()


def test_straight_through_gradient_reaches_every_weight():
    g_st, mask = _grads(straight_through=True)
    g_plain, _ = _grads(straight_through=False)
    # dL/d(W*T) applied to every entry: equals the plain gradient where kept, and is nonzero where pruned
    torch.testing.assert_close(g_st * mask, g_plain)
    assert (g_st[0, :2] != 0).all()


def test_forward_uses_masked_weight_for_both_rules():
    for st in (False, True):
        m = _mlp()
        p = attach_masks(m, ["0.weight"], straight_through=st)["0.weight"]
        p.mask.zero_()
        assert torch.count_nonzero(m[0].weight) == 0
        torch.testing.assert_close(m[0](torch.ones(1, 4)), m[0].bias.unsqueeze(0))


def test_state_dict_carries_mask_and_loads_into_plain_model():
    m = _mlp()
    attach_masks(m)["0.weight"].mask[1] = 0
    sd = m.state_dict()
    assert "0.parametrizations.weight.0.mask" in sd
    fresh = _mlp()
    attach_masks_for_state_dict(fresh, sd)
    fresh.load_state_dict(sd)
    assert get_masks(fresh)["0.weight"].mask[1].sum() == 0
    assert get_masks(fresh)["0.weight"].mask[0].sum() == 4


def test_switching_rule_keeps_mask_values():
    m = _mlp()
    attach_masks(m)["2.weight"].mask[0, 0] = 0
    p = attach_masks(m, ["2.weight"], straight_through=True)["2.weight"]
    assert isinstance(p, StraightThroughMask) and p.mask[0, 0] == 0


def test_bake_and_effective_state_dict():
    m = _mlp()
    attach_masks(m)["0.weight"].mask[:, 0] = 0
    eff = effective_state_dict(m)
    assert set(eff) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert eff["0.weight"][:, 0].abs().sum() == 0
    assert get_masks(m)  # the model itself is untouched
    out_before = m(torch.ones(1, 4))
    bake(m)
    assert not get_masks(m) and isinstance(m[0].weight, nn.Parameter)
    torch.testing.assert_close(m(torch.ones(1, 4)), out_before)


def test_sparsity_report_counts_exactly():
    m = _mlp()
    attach_masks(m)["0.weight"].mask[:, :3] = 0
    rows = {r.name: r for r in sparsity_report(m)}
    assert (rows["0.weight"].nonzero, rows["0.weight"].numel) == (3, 12)
    assert rows["0.weight"].kept == 0.25
    assert rows["2.weight"].nonzero == 6


def test_an_unsupported_layer_is_left_as_it_is_and_named():
    """Coverage by layer, never refusal by model (issue 36): the LSTM is skipped and listed; the Linear is covered."""
    from netsurgeon.masks import skipped_layers

    m = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4))
    assert list(prunable_layers(m, "DNS")) == ["0"]
    assert skipped_layers(m)["1"].startswith("LSTM: parameter(s) weight_ih_l0")
    with pytest.raises(ValueError, match=r"DNS: the model has no Linear, Conv1d/Conv2d layer to compress \(it holds: "
                                         r"0: LSTM"):
        prunable_layers(nn.Sequential(nn.LSTM(4, 4)), "DNS")
    with pytest.raises(ValueError, match="no Linear, Conv1d/Conv2d layer to compress"):
        prunable_layers(nn.Sequential(nn.ReLU()))
    ok = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))  # norms are left alone, not refused
    assert list(prunable_layers(ok)) == ["0"]


def test_attach_masks_errors():
    with pytest.raises(ValueError, match="has no parameter 'gamma'"):
        attach_masks(_mlp(), ["0.gamma"])
    assert isinstance(attach_masks(_mlp(), ["0.bias"])["0.bias"], Mask)
