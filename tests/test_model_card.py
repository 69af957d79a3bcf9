"""Model cards (README.md) in merged/ and the range folders: built with huggingface_hub (ModelCardData, EvalResult;
`ModelCard.load` reads back every metric equal to the eval JSON), base_model a Hub id or left out, the base's license,
the routed model's cost; written by train and merge, refreshed by sample and eval, never stale, never breaking a
command."""
import json
import shutil

import pytest

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
    """(metadata, text) as huggingface_hub reads the card."""
    from huggingface_hub import ModelCard

    assert path.read_text().startswith("---\n")
    card = ModelCard.load(path)
    return card.data.to_dict(), card.text


@pytest.fixture(scope="module")
def card_run(tmp_path_factory, tiny_ddpm, tiny_images, heldout_images):
    d = tiny_recipe_dict(tiny_ddpm, tiny_images, tmp_path_factory.mktemp("card") / "run")
    d["train"].update(steps=2, checkpoint_every=2)
    d["merge"] = {"weights": [0.25, 0.75]}
    d["sample"] = {"scheduler": "ddim", "steps": 2, "num_images": 6, "batch_size": 6}
    d["eval"] = {"metrics": ["fid", "kid", "loss"], "reference": str(heldout_images), "loss_bins": 2}
    recipe = recipe_from_dict(d)
    run = RunDir(recipe.out_dir)
    run_train(recipe, run)
    return recipe, run


def test_training_writes_range_cards(card_run, tiny_ddpm):
    recipe, run = card_run
    for i in (0, 1):
        for folder in (run.final(i), run.final(i, ema=False)):
            meta, body = front(folder / "README.md")
            assert meta["library_name"] == "diffusers" and "base_model" not in meta and "license" not in meta
            assert f"(a local base model: `{tiny_ddpm.resolve()}`)" in body        # a path is not a Hub id
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
    assert set(ev["metrics"]) == {"fid", "kid", "kid_std", "loss_ratio"}
    meta, body = front(run.merged / "README.md")
    assert meta["library_name"] == "diffusers" and meta["model-index"][0]["name"] == "tiny-merged"
    from huggingface_hub import ModelCard

    results = ModelCard.load(run.merged / "README.md").data.eval_results
    assert {r.metric_type: r.metric_value for r in results} == ev["metrics"]          # every metric, equal
    assert {r.task_type for r in results} == {"unconditional-image-generation"}
    ref = recipe.eval.reference
    assert {(r.dataset_type, r.dataset_name) for r in results} == {("imagefolder", ref.rsplit("/", 1)[1])}
    assert f"against `{recipe.eval.reference}`" in body and "Held-out loss / base" in body
    assert "import yaml" not in open(model_card.__file__).read()

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


def test_metadata_of_lora_and_text_to_image_models():
    meta = model_card.card_data("text-to-image", "CompVis/stable-diffusion-v1-4", "creativeml-openrail-m", True, "x",
                                None).to_dict()
    assert meta["tags"][-2:] == ["text-to-image", "lora"] and meta["pipeline_tag"] == "text-to-image"
    assert meta["base_model"] == "CompVis/stable-diffusion-v1-4" and meta["license"] == "creativeml-openrail-m"
    assert "model-index" not in meta and "eval_results" not in meta


def test_a_base_card_without_metadata_has_no_license_and_no_warning(tiny_ddpm, tmp_path, caplog):
    """A base whose README.md has no metadata block (like assets/fmnist-ddpm's) has no license, said once quietly:
    huggingface_hub's "Repo card metadata block was not found" used to land in every `deme run` log."""
    import logging

    from deme_cli.engine.recipe import ModelSection

    folder = tmp_path / "base"
    shutil.copytree(tiny_ddpm, folder)
    (folder / "README.md").write_text("# a DDPM\n\nno metadata here\n")
    base = resolve_base(ModelSection(pretrained=str(folder)))
    with caplog.at_level(logging.WARNING):
        assert model_card.base_license(base) is None
    assert not [r for r in caplog.records if "metadata" in r.getMessage()]
    (folder / "README.md").write_text("\n---\nlicense: mit\n---\n# a DDPM\n")     # metadata after a blank line
    assert model_card.base_license(base) == "mit"


def test_a_hub_base_is_named_by_its_id_with_its_license(card_run, tiny_ddpm, tmp_path):
    """A base from the Hub (here a cache snapshot folder, as huggingface_hub lays it out) is base_model by its repo
    id, and its own card's license is the card's; a local folder is no Hub id."""
    from deme_cli.engine.recipe import ModelSection

    recipe, run = card_run
    snap = tmp_path / "hub" / "models--google--ddpm-tiny" / "snapshots" / "0123abc"
    shutil.copytree(tiny_ddpm, snap)
    (snap / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- pytorch\n---\n# a DDPM\n")
    base = resolve_base(ModelSection(pretrained=str(snap)))
    assert model_card.hub_id(base) == "google/ddpm-tiny" and model_card.base_license(base) == "apache-2.0"
    assert model_card.hub_id(type("B", (), {"pretrained": "google/ddpm-cifar10-32"})()) == "google/ddpm-cifar10-32"
    assert model_card.hub_id(resolve_base(recipe.model)) is None

    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root)
    meta, body = front(model_card.write_card(copy.final(0), copy, base, "range:0"))
    assert meta["base_model"] == "google/ddpm-tiny" and meta["license"] == "apache-2.0"
    assert "`google/ddpm-tiny` finetuned" in body and "local base model" not in body


@pytest.mark.parametrize("lora", [False, True])
def test_a_routed_model_card_says_what_it_is_and_costs(card_run, tmp_path, lora):
    """merged/ written by `deme merge --method routed` (merge.json "method": "routed"): the card says it routes each
    step to the range model owning t, costs the base's compute, and holds N UNets or the base plus N adapters."""
    recipe, run = card_run
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root, ignore=shutil.ignore_patterns("merged"))
    shutil.copytree(run.final(0), copy.merged)
    (copy.merged / "deme.json").write_text(json.dumps({"kind": "merged", "recipe": "tiny", "method": "routed",
                                                       "ranges": [{"index": 0}, {"index": 1}]}))
    (copy.merged / "merge.json").write_text(json.dumps({"method": "routed", "ranges": [{"index": 0}, {"index": 1}]}))
    if lora:
        meta = json.loads((copy.final(0) / "deme.json").read_text())
        (copy.final(0) / "deme.json").write_text(json.dumps({**meta, "adapter": {"kind": "lora", "rank": 4}}))
    meta, body = front(model_card.write_card(copy.merged, copy, resolve_base(recipe.model), "merged"))
    assert "## Routing and its cost" in body and "## Merge" not in body and "merge weight" not in body
    assert "[0, 500) → range 0, [500, 1000) → range 1" in body
    assert "one range model per denoising step, so sampling costs what the base costs" in body
    held = "the base UNet once plus 2 LoRA adapters" if lora else "2 UNets, one per range"
    assert held in body and "its weight files take" in body and "the base's UNet" in body
    assert ("lora" in meta["tags"]) == lora


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
