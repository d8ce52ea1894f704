from pathlib import Path

import pytest
import torch

import netsurgeon as ns
from netsurgeon.pipeline import Pipeline

load_recipe = Pipeline.from_yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_recipes_parse_and_compose(path):
    pipe = load_recipe(path)
    pipe.check(has_data=True)
    assert pipe.stages[-1].method == "encode"
    assert all(st.method in ns.pipeline.methods() for st in pipe.stages)


def test_recipe_errors_name_the_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - magnitude: {sparsty: 0.4}\n")
    with pytest.raises(ValueError, match=r"stage 1: magnitude: unknown key\(s\) \['sparsty'\]; valid keys: epochs"):
        load_recipe(p)
    p.write_text("stages:\n  - sorcery: {}\n")
    with pytest.raises(ValueError, match="unknown method 'sorcery'; valid methods: autoprune"):
        load_recipe(p)
    p.write_text("stages: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(p)
    p.write_text("stages:\n  - magnitude: {sparsity: 1.5}\n")
    with pytest.raises(ValueError, match=r"magnitude: sparsity must be a number in \[0, 1\).*got 1.5"):
        load_recipe(p)
    p.write_text("stagez: []\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stagez'\]"):
        load_recipe(p)
    p.write_text("stages:\n  - kmeans: {bits: 4}\n  - dns: {}\n")
    with pytest.raises(ValueError, match="stage 2 'dns' needs float weights, but stage 1 'kmeans' leaves k-means"):
        load_recipe(p).check(has_data=True)


def test_a_recipe_in_the_removed_flat_format_is_refused_by_name(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("method: magnitude\nsparsity: 0.9\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['method', 'sparsity'\]; a recipe has 'stages'"):
        load_recipe(p)


def test_quality_recipe_prunes_and_retrains(digits):
    torch.manual_seed(0)
    m = ns.build_model("lenet300", digits.input_shape)
    ns.train(m, digits, ns.TrainConfig(epochs=5, lr=0.05))
    load_recipe(RECIPES / "magnitude_quality.yaml").run(m, digits)
    nz, total = ns.stats.count_nonzero(m)
    assert nz < 0.6 * total  # three rounds of |w| < 0.5 std of the survivors remove a good half
    assert ns.evaluate(m, digits.test)[1] > 0.9
