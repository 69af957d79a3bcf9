"""Stable Diffusion end to end through the `deme` command line (in-process): split, train, merge, sample, eval.

The tiny SD-like pipeline of conftest.build_tiny_sd; bad input (a missing caption column, an empty prompt file, a
pipeline without a text encoder) exits with code 2 and one sentence.
"""
from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from deme_cli.cli import app


def write_recipe(path, tiny_sd, run, **extra) -> str:
    """A tiny SD recipe (TOML) at `path`; `extra` maps 'section.key' to a TOML literal."""
    lines = {
        "name": '"tiny-sd"', "seed": "0",
        "model.pretrained": json.dumps(str(tiny_sd["pipeline"])),
        "data.source": '"imagefolder"', "data.path": json.dumps(str(tiny_sd["images"])), "data.resolution": "16",
        "data.center_crop": "true", "data.random_flip": "true", "data.caption_dropout": "0.2",
        "ranges.n": "2",
        "train.steps": "2", "train.batch_size": "4", "train.lr": "1e-4", "train.mixed_precision": '"no"',
        "train.checkpoint_every": "2", "train.gradient_checkpointing": "true",
        "merge.weights": "[0.5, 0.5]",
        "sample.prompts": json.dumps(str(tiny_sd["prompts"])), "sample.guidance_scale": "3.0",
        "sample.negative_prompt": '"a dog"', "sample.scheduler": '"ddim"', "sample.steps": "3",
        "sample.num_images": "5", "sample.batch_size": "4", "sample.seed": "7", "sample.output_size": "24",
        "eval.metrics": '["clip"]', "eval.clip_model": json.dumps(str(tiny_sd["clip"])),
        "output.dir": json.dumps(str(run)),
    }
    lines.update(extra)
    sections: dict = {}
    top = []
    for key, value in lines.items():
        if "." in key:
            sec, k = key.split(".", 1)
            sections.setdefault(sec, []).append(f"{k} = {value}")
        else:
            top.append(f"{key} = {value}")
    text = "\n".join(top) + "\n" + "".join(f"[{s}]\n" + "\n".join(v) + "\n" for s, v in sections.items())
    path.write_text(text)
    return str(path)


def deme(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_sd_split_train_merge_sample_eval(tmp_path, tiny_sd):
    from PIL import Image

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "sd.toml", tiny_sd, run)
    assert deme("split", recipe)[0] == 0

    code, out, err = deme("train", recipe, "--all", "--json")
    assert code == 0, err
    trained = json.loads(out)["ranges"]
    assert [r["steps"] for r in trained] == [2, 2]
    for i in (0, 1):
        meta = json.loads((run / "ranges" / str(i) / "final" / "deme.json").read_text())
        own = run / "ranges" / str(i) / "final" / "unet" / "model-0"       # a DemeUNet: the UNet and its projections
        assert meta["range"]["index"] == i and (own / "projection.safetensors").is_file()
    # the SD UNet's final/ is the EMA state of the last checkpoint in every tensor (the export bug's other model kind)
    from safetensors.torch import load_file
    ckpt = run / "ranges" / "1" / "checkpoints" / "step-2"
    ema, raw = load_file(str(ckpt / "ema.safetensors")), load_file(str(ckpt / "student.safetensors"))
    final = run / "ranges" / "1" / "final"
    got = {f"unet.{k}": v for k, v in load_file(str(final / "unet" / "model-0" / "unet.safetensors")).items()}
    got.update({f"projections.{k}": v for k, v in load_file(str(final / "unet" / "model-0" / "projection.safetensors")).items()})
    assert set(got) == set(ema) and all(got[k].equal(ema[k]) for k in ema)
    assert sum(not ema[k].equal(raw[k]) for k in ema) > len(ema) // 2
    caches = list((run / "cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "cache.json").is_file()     # one cache, shared by both ranges

    assert deme("merge", recipe)[0] == 0
    assert (run / "merged" / "unet" / "model-0" / "projection.safetensors").is_file()

    prompts = ["the cat", "the dog", "a cat", "a dog"]
    for m in ("base", "merged", "ensemble"):
        code, out, err = deme("sample", recipe, "--model", m)
        assert code == 0, err
        folder = run / "samples" / m
        meta = json.loads((folder / "samples.json").read_text())
        assert meta["prompts"] == prompts + prompts[:1]                   # image k gets prompt k mod 4
        assert meta["guidance_scale"] == 3.0 and meta["negative_prompt"] == "a dog"
        assert sorted(p.name for p in folder.glob("0*.png")) == [f"{k:06d}.png" for k in range(5)]
        assert Image.open(folder / "000004.png").size == (24, 24)         # sample.output_size
    calls = json.loads((run / "samples" / "ensemble" / "samples.json").read_text())["model_info"]["calls_per_range"]
    assert len(calls) == 2 and all(c > 0 for c in calls)                  # DDIM-3 at t = 667, 334, 1: both ranges
    base = [Image.open(run / "samples" / "base" / f"{k:06d}.png").tobytes() for k in range(5)]
    assert len(set(base)) == 5                                            # per-image seeds (and prompts) differ

    code, out, err = deme("eval", recipe, "--models", "base,merged,ensemble", "--json")
    assert code == 0, err
    for m in ("base", "merged", "ensemble"):
        res = json.loads((run / "eval" / f"{m}.json").read_text())
        # the plumbing only: the score's value and its image-prompt pairing are checked by hand in test_metrics.py
        assert 0.0 <= res["metrics"]["clip_score"] <= 100.0 and res["num_images"] == 5
        assert res["sampler"]["guidance_scale"] == 3.0 and res["clip_model"] == str(tiny_sd["clip"])


def _assert_usage_error(code, out, err, words):
    assert code == 2, err
    assert "Traceback" not in err + out
    msg = err.strip()
    assert msg.startswith("error:") and words in msg
    assert msg.count("\n") <= 2                                           # one sentence (rich may wrap it)


def test_missing_caption_column_exits_2(tmp_path, tiny_sd):
    import datasets
    from PIL import Image

    ds = tmp_path / "ds"
    imgs = [Image.open(tiny_sd["images"] / f"{k:04d}.png").convert("RGB") for k in range(4)]
    datasets.Dataset.from_dict({"image": imgs, "caption": ["a cat"] * 4}).save_to_disk(str(ds))
    recipe = write_recipe(tmp_path / "sd.toml", tiny_sd, tmp_path / "run", **{
        "data.source": '"hf"', "data.name": json.dumps(str(ds)), "data.caption_column": '"text"'})
    _assert_usage_error(*deme("train", recipe, "--range", "0"), "no column 'text' (columns: image, caption)")
    assert not (tmp_path / "run" / "ranges" / "0" / "final").exists()


def test_empty_prompt_file_exits_2(tmp_path, tiny_sd):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    recipe = write_recipe(tmp_path / "sd.toml", tiny_sd, tmp_path / "run", **{"sample.prompts": json.dumps(str(empty))})
    _assert_usage_error(*deme("sample", recipe, "--model", "base"), "holds no prompts")
    assert not (tmp_path / "run" / "samples" / "base" / "samples.json").exists()


def test_pipeline_without_text_encoder_exits_2(tmp_path, tiny_sd):
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_sd["pipeline"], pipe)
    shutil.rmtree(pipe / "text_encoder")
    recipe = write_recipe(tmp_path / "sd.toml", tiny_sd, tmp_path / "run",
                          **{"model.pretrained": json.dumps(str(pipe))})
    _assert_usage_error(*deme("train", recipe, "--range", "0"), "has no text_encoder/")
    _assert_usage_error(*deme("sample", recipe, "--model", "base"), "has no text_encoder/")
