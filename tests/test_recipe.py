"""The typed recipe: defaults, unknown keys with near-miss suggestions, --set overrides with type checking."""
import sys
from pathlib import Path

import pytest

from deme_cli.engine.errors import UsageError
from deme_cli.engine.recipe import load_recipe, parse_set

MIN = '''
name = "t"
[model]
pretrained = "some/model"
[data]
path = "imgs"
'''


def write(tmp_path, text):
    f = tmp_path / "r.toml"
    f.write_text(text)
    return f


def test_defaults_are_the_release_values(tmp_path):
    r = load_recipe(write(tmp_path, MIN))
    assert (r.train.adam_beta1, r.train.weight_decay, r.train.lr, r.train.max_grad_norm) == (0.95, 1e-6, 5e-5, 1.0)
    assert (r.deme.p, r.deme.consistency_weight, r.deme.projection, r.deme.antithetic) == (0.3, 1.0, True, True)
    assert r.deme.sampling == "per_batch" and r.ranges.n == 4 and r.train.ema_max_decay == 0.9999
    assert r.out_dir == Path("runs/t")


def test_unknown_key_names_key_and_near_miss(tmp_path):
    with pytest.raises(UsageError, match=r"unknown recipe key 'train\.stesp'.*'train\.steps'"):
        load_recipe(write(tmp_path, MIN + "[train]\nstesp = 3\n"))
    with pytest.raises(UsageError, match="bogus_key"):
        load_recipe(write(tmp_path, MIN + "bogus_key = 3\n"))


def test_set_overrides_with_types(tmp_path):
    f = write(tmp_path, MIN)
    r = load_recipe(f, ["train.steps=7", "deme.projection=false", "merge.weights=[0.5, 0.5, 0, 0]",
                        "model.pretrained=/x/y", "output.dir=out"])
    assert r.train.steps == 7 and r.deme.projection is False and r.merge.weights == [0.5, 0.5, 0.0, 0.0]
    assert r.model.pretrained == "/x/y" and r.out_dir == Path("out")
    with pytest.raises(UsageError, match="train.steps"):
        load_recipe(f, ["train.steps=many"])
    with pytest.raises(UsageError, match="deme.p"):
        load_recipe(f, ["deme.p=1.5"])
    with pytest.raises(UsageError, match="unknown recipe key 'deme.pp'"):
        load_recipe(f, ["deme.pp=0.1"])
    with pytest.raises(UsageError, match="section.key=value"):
        parse_set("train.steps")


def test_out_overrides_and_cross_checks(tmp_path):
    f = write(tmp_path, MIN)
    assert load_recipe(f, out="elsewhere").out_dir == Path("elsewhere")
    with pytest.raises(UsageError, match="merge.weights has 2 values"):
        load_recipe(f, ["merge.weights=[1, 2]"])


def test_malformed_and_missing(tmp_path):
    with pytest.raises(UsageError, match="not valid TOML"):
        load_recipe(write(tmp_path, "not = [toml\n"))
    with pytest.raises(UsageError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match="model"):
        load_recipe(write(tmp_path, 'name = "x"\n'))


def test_resolved_toml_roundtrips(tmp_path):
    r = load_recipe(write(tmp_path, MIN), ["train.steps=9"])
    text = r.to_toml()
    again = load_recipe(write(tmp_path, text))
    assert again == r.resolved() and again.resolved() == again and again.to_toml() == text


@pytest.mark.parametrize("sets", [[], ['deme.adapter="lora"'], ['deme.adapter="lora"', "deme.lora_alpha=4.0"]])
def test_a_run_resumed_from_its_resolved_recipe_records_the_same_inputs(tmp_path, sets):
    """`deme run runs/x/recipe.resolved.toml` must see the recipe values the run recorded (deme.lora_alpha once
    resolved to the rank there, and the run refused its own recipe)."""
    from deme_cli.commands.train import range_inputs

    r = load_recipe(write(tmp_path, MIN), sets)
    again = load_recipe(write(tmp_path, r.to_toml()))

    def inputs(x):
        return range_inputs(data=x.data, ranges=x.ranges, train=x.train, deme=x.deme, seed=x.seed)
    assert inputs(again) == inputs(r)


def test_resolved_toml_records_the_value_used_for_every_key(tmp_path):
    """Keys whose default follows from other keys are written with the value the stages use; keys left unset are
    listed as comments, so every key of every section appears in the file."""
    from deme_cli.engine.recipe import tomllib

    from deme_cli.engine.recipe import Recipe, default_shapes

    r = load_recipe(write(tmp_path, MIN), ["sample.num_images=77", "sample.steps=13", "ranges.n=3"])
    text = r.to_toml()
    d = tomllib.loads(text)
    assert d["eval"]["num_images"] == 77 and d["merge"]["search_steps"] == 13
    assert d["merge"]["shapes"] == default_shapes(3) and d["merge"]["weights"] == "uniform"
    assert d["output"]["dir"] == str(r.out_dir) and d["data"]["caption_column"] == "text"
    for section, field in Recipe.model_fields.items():
        keys = getattr(field.annotation, "model_fields", None)
        if keys is None:
            assert section in d
            continue
        for k in keys:
            assert k in d[section] or f"# {k}: not set" in text, f"{section}.{k}"
    assert "# revision: not set" in text and "revision" not in d["model"]


@pytest.mark.parametrize("name", ["cifar10", "lsun-church", "lsun-bedroom", "sd-coco30k", "sd-imagenet1k",
                                  "sd-partiprompts", "quickstart", "sd-coco30k-lora", "sd-imagenet1k-lora",
                                  "sd-partiprompts-lora"])
def test_shipped_recipes_validate(name):
    f = Path(__file__).parent.parent / "recipes" / f"{name}.toml"
    if not f.exists():
        pytest.skip(f"{f.name} not in this checkout")
    load_recipe(f)


@pytest.mark.parametrize("name", ["sd-coco30k", "sd-imagenet1k", "sd-partiprompts"])
def test_lora_variants_of_the_sd_recipes_differ_only_in_the_lora_keys(name):
    folder = Path(__file__).parent.parent / "recipes"
    full = load_recipe(folder / f"{name}.toml").model_dump()
    lora = load_recipe(folder / f"{name}-lora.toml").model_dump()
    diff = {(sec, k) for sec in full for k in (full[sec] if isinstance(full[sec], dict) else [None])
            if (full[sec].get(k) if k else full[sec]) != (lora[sec].get(k) if k else lora[sec])}
    assert diff == {("name", None), ("train", "lr"), ("deme", "adapter"), ("deme", "lora_alpha"), ("output", "dir")}
    assert lora["deme"]["adapter"] == "lora" and lora["deme"]["lora_rank"] == 16


def test_cli_import_is_light():
    import subprocess

    code = "import sys, deme_cli.cli; sys.exit(1 if ('torch' in sys.modules or 'diffusers' in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
