"""Model cards (README.md) in merged/ and the range folders: Hugging Face's format (front matter that
huggingface_hub reads, model-index equal to the eval JSON), written by train and merge, refreshed by sample and eval,
never stale, never breaking a command."""
import json

import pytest
import yaml

from conftest import tiny_recipe_dict
from deme_cli.commands.eval import run_eval
from deme_cli.commands.merge import run_merge
from deme_cli.commands.sample import run_sample
from deme_cli.commands.train import run_train
from deme_cli.engine import model_card
from deme_cli.engine.base import resolve_base
from deme_cli.engine.recipe import recipe_from_dict
from deme_cli.engine.runs import RunDir


def front(path) -> tuple[dict, str]:
    text = path.read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture(scope="module")
def card_run(tmp_path_factory, tiny_ddpm, tiny_images, heldout_images):
    d = tiny_recipe_dict(tiny_ddpm, tiny_images, tmp_path_factory.mktemp("card") / "run")
    d["train"].update(steps=2, checkpoint_every=2)
    d["merge"] = {"weights": [0.25, 0.75]}
    d["sample"] = {"scheduler": "ddim", "steps": 2, "num_images": 6, "batch_size": 6}
    d["eval"] = {"metrics": ["fid", "kid"], "reference": str(heldout_images)}
    recipe = recipe_from_dict(d)
    run = RunDir(recipe.out_dir)
    run_train(recipe, run)
    return recipe, run


def test_training_writes_range_cards(card_run, tiny_ddpm):
    recipe, run = card_run
    for i in (0, 1):
        for folder in (run.final(i), run.final(i, ema=False)):
            meta, body = front(folder / "README.md")
            assert meta["library_name"] == "diffusers" and meta["base_model"] == str(tiny_ddpm.resolve())
            assert meta["tags"] == ["diffusers", "deme", "decouple-then-merge", "unconditional-image-generation"]
            assert meta["pipeline_tag"] == "unconditional-image-generation" and "model-index" not in meta
            lo, hi = (0, 500) if i == 0 else (500, 1000)
            assert f"| **{i}** (this model) | [{lo}, {hi}) | 2 |" in body
            assert "| learning rate (AdamW) | 0.0001 |" in body and "https://arxiv.org/abs/2410.06664" in body
            assert f'load_pipeline("{run.root}", model="range:{i}")' in body
    assert "final/ holds the EMA ones" in (run.final(0, ema=False) / "README.md").read_text()


def test_merge_sample_and_eval_fill_the_merged_card(card_run):
    from huggingface_hub import ModelCard

    from nets import tiny_extractor

    recipe, run = card_run
    run_merge(recipe, run)
    meta, body = front(run.merged / "README.md")
    assert "model-index" not in meta and "## Samples" not in body
    assert "| 0 | [0, 500) | 2 | 0.25 |" in body and "| 1 | [500, 1000) | 2 | 0.75 |" in body
    assert "task_arithmetic" in body

    run_sample(recipe, run, "merged")
    assert (run.merged / "grid.png").read_bytes() == (run.samples("merged") / "grid.png").read_bytes()
    assert "![samples](grid.png)" in front(run.merged / "README.md")[1]

    run_eval(recipe, run, ["merged"], extractor=tiny_extractor(dim=8))
    ev = json.loads(run.eval_json("merged").read_text())
    meta, body = front(run.merged / "README.md")
    want = [{"type": k, "value": ev["metrics"][k], "name": n} for k, n in (("fid", "FID"), ("kid", "KID"))]
    assert meta["model-index"][0]["results"][0]["metrics"] == want
    card = ModelCard.load(run.merged / "README.md").data.to_dict()
    assert card["library_name"] == "diffusers"
    result = card["model-index"][0]["results"][0]
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"fid": ev["metrics"]["fid"],
                                                                   "kid": ev["metrics"]["kid"]}
    assert result["task"]["type"] == "unconditional-image-generation"
    assert result["dataset"]["type"] == str(recipe.eval.reference)

    # merged again with other weights: the old samples and eval results describe another model and are left out
    run_merge(recipe, run, weights=[0.5, 0.5], force=True)
    meta, body = front(run.merged / "README.md")
    assert "model-index" not in meta and "grid.png" not in body and not (run.merged / "grid.png").exists()
    # sampled again, not evaluated again: the grid is this model's, the scores are still the old model's
    run_sample(recipe, run, "merged", force=True)
    meta, body = front(run.merged / "README.md")
    assert "model-index" not in meta and "![samples](grid.png)" in body


def test_a_lora_range_card_says_lora(tiny_ddpm, tiny_images, tmp_path):
    d = tiny_recipe_dict(tiny_ddpm, tiny_images, tmp_path / "run")
    d["train"].update(steps=1, checkpoint_every=1)
    d["deme"].update(adapter="lora", lora_rank=4)
    run = RunDir(tmp_path / "run")
    run_train(recipe_from_dict(d), run, 0)
    meta, body = front(run.final(0) / "README.md")
    assert meta["tags"][-1] == "lora" and "| LoRA rank / alpha | 4 / 4 |" in body
    assert "the LoRA adapter on the base UNet (`unet/base/`)" in body and "trust_remote_code=True" in body
    assert "as LoRA adapters on the timesteps [0, 500)" in body


def test_front_matter_of_lora_and_text_to_image_models():
    meta = yaml.safe_load(model_card.front_matter("text-to-image", "CompVis/stable-diffusion-v1-4", True, "x",
                                                  None)[4:-4])
    assert meta["tags"][-2:] == ["text-to-image", "lora"] and meta["pipeline_tag"] == "text-to-image"
    assert meta["base_model"] == "CompVis/stable-diffusion-v1-4"


def test_a_hub_id_is_the_base_model_and_a_folder_its_path(tiny_ddpm):
    base = resolve_base(recipe_from_dict(tiny_recipe_dict(tiny_ddpm, tiny_ddpm, tiny_ddpm)).model)
    assert model_card.base_model_id(base) == str(tiny_ddpm.resolve())
    hub = type("B", (), {"pretrained": "google/ddpm-cifar10-32"})()
    assert model_card.base_model_id(hub) == "google/ddpm-cifar10-32"


def test_a_failing_card_is_one_warning_and_the_command_succeeds(card_run, monkeypatch, capsys):
    recipe, run = card_run

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(model_card, "render", broken)
    out = run_merge(recipe, run, weights=[0.1, 0.9], force=True)
    assert not out["skipped"] and json.loads((run.merged / "merge.json").read_text())["weights"] == [0.1, 0.9]
    err = capsys.readouterr().err
    assert "could not write the model card" in err and "disk full" in err


def test_the_card_says_when_the_lora_file_alone_is_not_the_range_model(tmp_path):
    """A Stable Diffusion LoRA range folder's pytorch_lora_weights.safetensors lacks the projections: with them the
    card says the file alone is not the range model; without them, that the file is the adapter."""
    import json

    folder = tmp_path / "final"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"unet": ["deme_unet", "DemeUNet"]}))
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")
    for projection in (True, False):
        (folder / "unet" / "config.json").write_text(json.dumps(
            {"deme": {"ranges": None, "projection": projection, "lora": {"layers": ["a"]}}}))
        text = " ".join(model_card._without_deme(folder))
        assert "load_lora_weights" in text and ("the base is not this range model" in text) == projection
