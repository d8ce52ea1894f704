from pathlib import Path

import pytest
import torch

import netsurgeon as ns
from netsurgeon.recipes import apply_recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_recipes_parse(path):
    r = load_recipe(path)
    assert r.method in ("magnitude", "dns", "woodfisher", "autoprune")
    assert not r.quantize or set(r.quantize["bits"]) == {"conv", "fc"}
    r.train_config()


def test_recipe_errors_name_the_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("method: magnitude\nsparsity: 0.5\nsparsty: 0.4\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sparsty'\]"):
        load_recipe(p)
    p.write_text("method: magnitude\nsparsity: 0.5\nfinetune: {epoch: 3}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\] under 'finetune'"):
        load_recipe(p)
    p.write_text("method: sorcery\nsparsity: 0.5\n")
    with pytest.raises(ValueError, match="method must be one of"):
        load_recipe(p)
    p.write_text("method: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(p)
    p.write_text("method: magnitude\n")
    with pytest.raises(ValueError, match="exactly one of 'sparsity' or 'quality'"):
        load_recipe(p)


def test_quality_recipe_prunes_and_retrains(digits, tmp_path):
    torch.manual_seed(0)
    m = ns.build_model("lenet300", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=5, lr=0.05))
    r = load_recipe(RECIPES / "magnitude_quality.yaml")
    apply_recipe(m, digits, r)
    nz, total = ns.stats.count_nonzero(m)
    assert nz < 0.6 * total  # three rounds of |w| < 1.0 std remove a good half
    assert ns.evaluate(m, digits.test)[1] > 0.9
