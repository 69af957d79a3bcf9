"""`deme report`: one self-contained HTML file and a Markdown report of a run, what a partial run lacks, the CI step
summary, and `deme run` ending with the report."""
from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_recipe_dict
from deme_cli.cli import app
from deme_cli.engine.recipe import load_recipe, recipe_from_dict
from deme_cli.engine.report_data import training_seconds
from deme_cli.engine.runs import RunDir, read_json

WEIGHTS = [0.3, 0.7]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_ddpm, tiny_images):
    """A finished tiny run, shared read-only: 2 ranges x 2 steps (previews), merged, base and merged sampled (8
    images, same seeds) and scored (FID, KID with a tiny extractor; loss by timestep). Returns (recipe file, run)."""
    import torch

    from deme_cli.commands.eval import run_eval
    from deme_cli.commands.merge import run_merge
    from deme_cli.commands.sample import run_sample
    from deme_cli.commands.train import run_train
    from nets import tiny_feature_net

    root = tmp_path_factory.mktemp("report")
    torch.jit.script(tiny_feature_net(dim=8)).save(str(root / "features.pt"))
    d = tiny_recipe_dict(tiny_ddpm, tiny_images, root / "run")
    d["train"].update(steps=2, checkpoint_every=2, preview_every=2, preview_images=4, preview_steps=2)
    d["merge"] = {"weights": WEIGHTS}
    d["sample"] = {"scheduler": "ddim", "steps": 2, "num_images": 8, "batch_size": 8}
    d["eval"] = {"reference": str(tiny_images), "metrics": ["fid", "kid", "loss"], "batch_size": 8,
                 "feature_extractor": str(root / "features.pt"), "loss_bins": 4, "loss_num_images": 8}
    d["run"] = {"models": ["base", "merged"]}
    (root / "recipe.toml").write_text(recipe_from_dict(d).to_toml())
    recipe = load_recipe(root / "recipe.toml")        # as the commands read it
    run = RunDir(recipe.out_dir)
    run_train(recipe, run)
    run_merge(recipe, run)
    for m in ("base", "merged"):
        run_sample(recipe, run, m)
    run_eval(recipe, run, ["base", "merged"])
    (run.root / "recipe.resolved.toml").write_text(recipe.to_toml())
    return root / "recipe.toml", run


class Page(HTMLParser):
    """Every tag with its attributes, and the text."""

    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def report(*args, env=None):
    r = CliRunner().invoke(app, ["report", *map(str, args)], env=env)
    return r


def fmt(v) -> str:            # how the report prints a number: 4 significant digits
    return f"{v:.4g}"


def test_html_is_one_self_contained_file_with_the_runs_numbers(full_run):
    from PIL import Image

    recipe, run = full_run
    r = report(recipe, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    html = open(out["html"]).read()
    assert out["html"] == str(run.root / "report" / "index.html") and out["missing"] == []
    page = Page()
    page.feed(html)
    page.close()

    # self-contained: every image a PNG data URI, no script, nothing fetched
    imgs = [a["src"] for t, a in page.tags if t == "img"]
    assert len(imgs) >= 7          # 2 sample grids, 2 training curves, 2 previews, the loss by timestep
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        assert im.format == "PNG" and im.size[0] > 0
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed")]
    refs = [v for _, a in page.tags for k, v in a.items() if k in ("src", "href", "srcset", "action", "data")]
    assert all(v.startswith("data:") for v in refs)
    assert "url(" not in html and "@import" not in html and "<script" not in html.lower()

    # the eval numbers as eval/<model>.json has them, the images, reference and extractor, the FID note
    cells = page.text                       # a table cell's text is one piece
    for m in ("base", "merged"):
        ev = read_json(run.eval_json(m))
        assert fmt(ev["metrics"]["fid"]) in cells
        assert f"{fmt(ev['metrics']['kid'])} ± {fmt(ev['metrics']['kid_std'])}" in cells
        assert fmt(ev["metrics"]["loss_ratio"]) in cells
    assert ev["num_images"] == 8 and "8" in cells
    text = "".join(page.text)
    assert ev["reference"]["path"] in text and ev["feature_extractor"]["path"] in text
    assert "biased" in text and "5,000" in text
    assert "same seeds" in text
    # the merge weights and the ranges
    assert [fmt(w) for w in WEIGHTS] == ["0.3", "0.7"] and "0.3" in cells and "0.7" in cells
    assert "[0, 500)" in cells and "[500, 1000)" in cells
    # the recipe and the versions
    assert 'name = "tiny"' in text and "diffusers" in cells and "torch" in cells

    md = open(out["markdown"]).read()
    for m in ("base", "merged"):
        ev = read_json(run.eval_json(m))
        assert f"| {fmt(ev['metrics']['fid'])} |" in md
        assert f"{fmt(ev['metrics']['kid'])} ± {fmt(ev['metrics']['kid_std'])}" in md
    for name in ("grid-base.png", "grid-merged.png", "training-range-0.png", "loss-by-t.png"):
        assert f"]({name})" in md and (run.root / "report" / name).is_file()


def test_training_times_come_from_the_metrics_lines(full_run):
    _, run = full_run
    lines = [json.loads(x) for x in run.metrics(0).read_text().splitlines()]
    assert all(x["elapsed_s"] >= 0 for x in lines) and lines[-1]["elapsed_s"] >= lines[0]["elapsed_s"]
    assert training_seconds(lines) == pytest.approx(lines[-1]["elapsed_s"], abs=0.01)
    # a resumed range: the last value of each process that trained it, added up
    assert training_seconds([{"elapsed_s": v} for v in (1.0, 2.0, 3.0, 0.5, 1.5)]) == 4.5
    assert training_seconds([{"step": 1}]) is None
    env = read_json(run.final(0) / "deme.json")["environment"]           # what the range trained on
    assert env["python"] and env["torch"] and env["diffusers"] and env["cpus"] >= 1 and env["gpus"] is not None


def test_partial_run_names_what_is_missing_and_draws_the_heatmap(full_run, tmp_path):
    from deme_cli.engine.gradients import save_matrix

    recipe, run = full_run
    part = tmp_path / "part"
    shutil.copytree(run.root, part, ignore=shutil.ignore_patterns("merged", "samples", "eval", "report", "run.json"))
    t = np.array([125, 375, 625, 875])
    save_matrix(part / "analysis" / "gradients.npz", np.eye(4) * 0.5 + 0.5, t, [0, 250, 500, 750, 1000], 1000,
                {"method": "exact", "sketch_dim": 0, "model_hash": "0123456789", "params": "all", "num_params": 10,
                 "batch_size": 2, "seed": 0})
    r = report(recipe, "--out", part)
    assert r.exit_code == 0, r.output
    html = (part / "report" / "index.html").read_text()
    md = (part / "report" / "report.md").read_text()
    for text in (html.replace("<code>", "`").replace("</code>", "`"), md):
        assert f"no merged model: run `deme merge {recipe} --out {part}`" in text
        assert f"no samples of the merged model: run `deme sample {recipe} --out {part} --model merged`" in text
        assert f"`deme sample {recipe} --out {part} --model base`" in text
        assert f"no evaluation: run `deme eval {recipe} --out {part} --models base,merged`" in text
    assert "not yet: no merged model" in r.output
    assert (part / "report" / "gradients.png").is_file()                    # drawn from the .npz
    assert html.count("<img ") == 5                # the heat map, 2 training curves, 2 previews
    assert not (part / "merged").exists() and not (part / "samples").exists()     # the report only wrote report/

    bad = report(recipe, "--out", tmp_path / "nope")
    assert bad.exit_code == 2 and "does not exist" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "nope").exists()


def test_step_summary_is_appended(full_run, tmp_path):
    recipe, run = full_run
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    for _ in range(2):
        r = report(recipe, env={"GITHUB_STEP_SUMMARY": str(summary)})
        assert r.exit_code == 0, r.output
    text = summary.read_text()
    assert text.startswith("earlier step\n") and text.count("### deme: tiny") == 2
    assert "FID" in text and fmt(read_json(run.eval_json("merged"))["metrics"]["fid"]) in text
    assert "train range 0" in text and len(text) < 4000                    # short: not the whole report


def test_deme_run_ends_with_the_report_and_survives_a_failing_one(full_run, tmp_path, monkeypatch):
    from deme_cli.commands.pipeline import run_pipeline
    from deme_cli.engine import report as report_module

    recipe_file, run = full_run
    copy = tmp_path / "run"
    shutil.copytree(run.root, copy, ignore=shutil.ignore_patterns("report"))
    recipe = load_recipe(recipe_file, out=str(copy))
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    def broken(*a, **k):
        raise RuntimeError("no pictures today")

    with monkeypatch.context() as m:
        m.setattr(report_module, "render_html", broken)
        warnings = []
        m.setattr("deme_cli.engine.ui.warn", warnings.append)
        r = run_pipeline(recipe, RunDir(copy))
    assert r["report"] is None and len(warnings) == 1 and "no pictures today" in warnings[0]
    assert {s["stage"]: s["status"] for s in r["stages"]}["train"] == "kept"

    r = run_pipeline(recipe, RunDir(copy))
    assert r["report"] == {"html": str(copy / "report" / "index.html"), "markdown": str(copy / "report" / "report.md")}
    html = (copy / "report" / "index.html").read_text()
    assert "deme run: train" in html and "recorded (run.json)" in html
    assert read_json(copy / "run.json")["environment"]["python"]
    assert "FID" in summary.read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html_file, png, width=1200, height=2400):
    """Render a page with headless Chromium (Debian's `chromium`; .ci/run installs it) to a PNG of the viewport."""
    import subprocess

    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png}", f"file://{html_file}"],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    return np.asarray(Image.open(png).convert("RGB")).astype(int)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (.ci/run installs Debian's chromium)")
def test_a_real_browser_draws_the_reports_tables_and_images(full_run, tmp_path):
    """Headless Chromium renders index.html offline; the page shows its tables and its images: the same page with
    its images hidden (same layout) has far fewer coloured pixels, and with its tables hidden fewer dark ones."""
    recipe, run = full_run
    assert report(recipe).exit_code == 0
    html = (run.root / "report" / "index.html").read_text()
    page = screenshot(run.root / "report" / "index.html", tmp_path / "page.png")
    hidden = {}
    for what in ("img", "table"):
        f = tmp_path / f"no-{what}.html"
        f.write_text(html.replace("</head>", f"<style>{what} {{visibility: hidden}}</style></head>", 1))
        hidden[what] = screenshot(f, tmp_path / f"no-{what}.png")

    def drawn(a, b):         # pixels that differ between two renderings of the same layout
        return int((np.abs(a - b).sum(axis=2) > 60).sum())

    assert page.shape == (2400, 1200, 3)
    assert (page.min(axis=2) < 250).mean() > 0.03, "the page is (nearly) blank"
    assert drawn(page, hidden["img"]) > 20000           # plots, sample grids and previews
    assert drawn(page, hidden["table"]) > 3000          # the eval, loss and ranges tables' text and borders
    saturated = (page.max(axis=2) - page.min(axis=2)) > 60
    assert saturated.sum() > 5 * ((hidden["img"].max(axis=2) - hidden["img"].min(axis=2)) > 60).sum()
