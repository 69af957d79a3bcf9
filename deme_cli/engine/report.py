"""`deme report`: a run directory written up as `<run>/report/index.html`, one self-contained file (every image a
data: URI, inline CSS, no script, nothing fetched: it opens offline), and `<run>/report/report.md` with its PNGs next to
it in report/. report_data.py gathers what the run holds and report_render.py renders it; here the pictures are
copied or drawn (the training curves; the gradient heat map when only its .npz exists) and the files written.

With the environment variable GITHUB_STEP_SUMMARY set (a file, as in GitHub Actions), a short Markdown summary (the
eval table, the times, what is missing) is appended to that file.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from . import ui
from .errors import UsageError
from .report_data import collect, curves
from .report_render import render_html, render_markdown, step_summary
from .runs import RunDir, write_atomic

REPORT_DIR = "report"
HTML_FILE = "index.html"
MARKDOWN_FILE = "report.md"
STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


# --- writing -------------------------------------------------------------------------------------------------------

def _images(d: dict, out: Path) -> dict[str, Path]:
    """The report's PNGs in `out` (copied, or drawn here): key -> path."""
    from . import plots

    found: dict[str, Path] = {}

    def copy(key: str, src: Optional[Path], name: str) -> None:
        if src is not None:
            shutil.copyfile(src, out / name)
            found[key] = out / name

    grad = d["gradients"]
    if grad["png"] is not None:
        copy("gradients", grad["png"], "gradients.png")
    elif grad["npz"] is not None:
        found["gradients"] = _draw_heatmap(grad["npz"], out / "gradients.png")
    for t in d["training"]:
        if t["lines"]:
            found[f"train-{t['index']}"] = plots.training_curves(
                t["lines"], out / f"training-range-{t['index']}.png",
                f"range {t['index']}: timesteps [{t['lo']}, {t['hi']}), {t['steps']} steps",
                t["expected_fraction"])
        copy(f"preview-{t['index']}", t["preview"], f"preview-range-{t['index']}.png")
    copy("search", d["search_plot"], "merge-search.png")
    for s in d["samples"]:
        copy(f"grid-{s['folder']}", s["grid"], f"grid-{s['folder']}.png")
    lbt = curves(d)
    if lbt:               # drawn from the current numbers only (eval/loss-by-t.png shows one eval call's models)
        found["loss"] = plots.loss_by_t_plot(lbt, out / "loss-by-t.png",
                                             f"{d['name']}: held-out loss by timestep, ratio to the base")
    return {k: v for k, v in found.items() if v is not None}


def _draw_heatmap(npz: Path, path: Path) -> Optional[Path]:
    """gradients.png drawn from analysis/gradients.npz (when the PNG is missing); None when the file does not load."""
    from . import gradients

    try:
        m = gradients.load_matrix(npz)
        summary = gradients.summarize(m["matrix"], m["timesteps"], m["T"])
        import matplotlib

        matplotlib.use("Agg")              # files only, no display
        gradients.plot_heatmap(path, m["matrix"], m["timesteps"], m["edges"], m["T"], m["settings"], summary)
    except (UsageError, KeyError, TypeError, ValueError) as e:
        ui.warn(f"the gradient heat map could not be drawn from {npz} ({e})")
        return None
    return path


def write_report(run: RunDir, recipe_arg: str = "RECIPE", recipe_toml: Optional[str] = None) -> dict:
    """Write report/index.html and report/report.md (and append the step summary when GITHUB_STEP_SUMMARY is set);
    returns {"html", "markdown", "step_summary", "missing"}."""
    d = collect(run, recipe_arg, recipe_toml)
    out = run.root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    images = _images(d, out)
    for old in out.glob("*.png"):            # pictures of an earlier report that this one no longer shows
        if old not in images.values():
            old.unlink()
    write_atomic(out / HTML_FILE, render_html(d, images))
    write_atomic(out / MARKDOWN_FILE, render_markdown(d, {k: p.name for k, p in images.items()}))
    summary_file = os.environ.get(STEP_SUMMARY_ENV)
    if summary_file:
        try:
            with open(summary_file, "a", encoding="utf-8") as f:
                f.write(step_summary(d, out / HTML_FILE))
        except OSError as e:      # the report is written; a CI summary that cannot be is not worth failing for
            ui.warn(f"could not append the step summary to {STEP_SUMMARY_ENV}={summary_file} ({e.strerror or e})")
            summary_file = None
    return {"html": str(out / HTML_FILE), "markdown": str(out / MARKDOWN_FILE), "step_summary": summary_file or None,
            "missing": d["missing"]}
