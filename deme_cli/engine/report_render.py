"""The report of report.py rendered twice from one list of sections: HTML (self-contained: every image a
`data:image/png;base64,` URI, inline CSS, no script, no link to anything outside the file) and Markdown (images by
their names in report/), plus the short Markdown of a CI step summary.

A section is (title, blocks); a block is one of
  ("p", text)                      a paragraph; `code` in backticks
  ("list", [text, ...])
  ("table", header, rows)          cells are text or numbers (ui.fmt: 4 significant digits)
  ("images", [(key, caption), ...])   side by side; keys of the images dict of report.py
  ("code", language, text)         folded in the HTML
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Optional

from .loss_by_t import by_bins
from .report_data import FID_UNBIASED_FROM, curves, times
from .ui import fmt

METRICS = (("fid", "FID"), ("kid", "KID"), ("clip_score", "CLIP score"), ("loss_ratio", "loss / base"))
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 .2em; } pre { background: #f7f7f7; padding: .8em; overflow-x: auto; }
.images { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; } figure img { max-width: 100%; min-width: 16em; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; max-width: 40em; }
.missing { background: #fff6e0; border-left: 4px solid #e0a000; padding: .4em 1em; }
"""


# --- the sections ------------------------------------------------------------------------------------------------

def _eval_table(evals: list[dict]) -> tuple:
    """One row per model: FID, KID ± its std over subsets, CLIP score, loss / base (those any model has), images."""
    keys = [(k, label) for k, label in METRICS if any(e["metrics"].get(k) is not None for e in evals)]

    def cell(e: dict, k: str):
        v = e["metrics"].get(k)
        if k == "kid" and v is not None and e["metrics"].get("kid_std") is not None:
            return f"{fmt(v)} ± {fmt(e['metrics']['kid_std'])}"
        return v

    rows = [[e["model"]] + [cell(e, k) for k, _ in keys] + [e.get("num_images")] for e in evals]
    return ("table", ["model"] + [label + (" ± std" if k == "kid" else "") for k, label in keys] + ["images"], rows)


def _fid_note(evals: list[dict]) -> list:
    few = [e for e in evals if e["metrics"].get("fid") is not None and (e.get("num_images") or 0) < FID_UNBIASED_FROM]
    if not few:
        return []
    return [("p", f"FID is biased (upwards, by more the fewer the images) below {FID_UNBIASED_FROM:,} images, and "
                  f"{', '.join(e['model'] for e in few)} scored "
                  f"{', '.join(str(n) for n in sorted({e.get('num_images') for e in few}))}: compare models only at "
                  f"the same number of images, and not with published FIDs.")]


def _eval_blocks(d: dict) -> list:
    evals = d["eval"]
    if not evals:
        return [("p", "No model is evaluated yet.")]
    blocks: list = [_eval_table(evals)]
    refs = {_reference(e) for e in evals if e.get("reference")}
    exts = {_extractor(e) for e in evals if e.get("feature_extractor")}
    facts = [f"reference: {r}" for r in sorted(refs)] + [f"feature extractor: {x}" for x in sorted(exts)]
    facts += sorted({f"CLIP model: `{e['clip_model']}`" for e in evals if e.get("clip_model")})
    if facts:
        blocks.append(("p", "; ".join(facts) + "."))
    blocks += _fid_note(evals)
    notes = sorted({n for e in evals for n in e.get("notes") or []})
    if notes:
        blocks.append(("list", notes))
    blocks += _loss_blocks(d)
    if "loss" in d["images"]:
        blocks.append(("images", [("loss", "held-out loss by timestep, as a ratio to the base: each model a step over "
                                           "its own bins")]))
    return blocks


def _loss_blocks(d: dict) -> list:
    """The loss by timestep: one table per set of bins (loss_by_t.by_bins), rows matched by their edges; models
    scored on other bins are shown apart, with the command that re-scores them on the recipe's."""
    groups = by_bins(curves(d), d.get("loss_bins"))
    if not groups:
        return []
    blocks: list = []
    for k, (edges, group) in enumerate(groups):
        first = next(iter(group.values()))
        rows = [[f"[{lo}, {hi})", first["base_loss"][b]] + [rec["ratio"][b] for rec in group.values()]
                for b, (lo, hi) in enumerate(edges)]
        rows.append(["mean of ratios", None] + [rec["ratio_mean"] for rec in group.values()])
        intro = (f"Held-out denoising loss by timestep ({first.get('num_images')} images, one fixed noise and t per "
                 f"image): the base's loss, and each model's as a ratio to it (below 1: better).") if k == 0 else \
            (f"Scored on other bins or held-out images ({len(edges)} bins, {first.get('num_images')} images), so "
             f"shown apart:")
        blocks += [("p", intro), ("table", ["t", "base loss"] + list(group), rows)]
    if len(groups) > 1:
        others = [m for _, group in groups[1:] for m in group]
        blocks.append(("p", f"{', '.join(others)} cannot be compared bin by bin with {', '.join(groups[0][1])}: "
                            f"re-score them with the recipe's eval.loss_bins: `deme eval {d['recipe_arg']} --models "
                            f"{','.join(others)}`."))
    return blocks


def _stale_blocks(d: dict) -> list:
    """Numbers of models or samples that are no longer on disk: never shown as results, each with its command."""
    names = dict(METRICS, kid_std="KID std")
    rows = [[x["model"], ", ".join(f"{names.get(k, k)} {fmt(v)} (stale)" for k, v in x["metrics"].items()) or "-",
             x["why"], x["command"]] for x in d["stale"]]
    return [("p", "These results describe models or samples that were replaced since they were scored; they are "
                  "not shown as results above. The last column refreshes them."),
            ("table", ["model", "stale numbers", "why", "to refresh"], rows)]


def _take_away_blocks(d: dict) -> list:
    t = d["take_away"]
    if t is None:
        return [("p", "No model is evaluated yet: `deme eval` scores the models against the base.")]
    blocks: list = [("p", f"Verdict: {t['verdict']}."), ("table", t["header"], t["rows"])]
    spread = ("A model beats the base when its KID is lower by more than the spread, sqrt(std² + std_base²) of the "
              "two KIDs' std over subsets; FID, the CLIP score and the loss ratio come without a spread.")
    blocks.append(("p", spread))
    if t["notes"]:
        blocks.append(("list", t["notes"]))
    return blocks


def _reference(e: dict) -> str:
    r = e["reference"]
    n = f", {r['num_images']} images" if r.get("num_images") else ""
    return f"`{r.get('path')}` ({r.get('kind')}{n}; clean-fid {e.get('mode')} mode)"


def _extractor(e: dict) -> str:
    x = e["feature_extractor"]
    return f"{x.get('name')}" + (f" (`{x['path']}`)" if x.get("path") else "")


def _samples_blocks(d: dict) -> list:
    if not d["samples"]:
        return [("p", "No samples yet.")]
    shown = [s for s in d["samples"] if f"grid-{s['folder']}" in d["images"]]
    blocks: list = [("images", [(f"grid-{s['folder']}", f"{s['model']}: {s['num_images']} images, {s['scheduler']} "
                                 f"{s['steps']} steps, {s['precision']}" + ("" if s["complete"] else " (incomplete)"))
                                for s in shown])] if shown else []
    seeds = {(s["seeds"].get("base"), s["seeds"].get("rule")) for s in d["samples"]}
    if len(seeds) == 1:
        base, _ = next(iter(seeds))
        blocks.append(("p", f"Every model's images use the same seeds (image k: seed {base} + k, samples.json), so "
                            f"the same position in each grid starts from the same noise."))
    else:
        blocks.append(("p", "The models were sampled with different seeds: " + ", ".join(
            f"{s['model']} from {s['seeds'].get('base')}" for s in d["samples"]) + " (samples.json)."))
    return blocks


def _merge_blocks(d: dict) -> list:
    m = d["merge"]
    if m is None:
        return [("p", "No merged model yet.")]
    weights = m.get("weights") or []
    rows = [[r.get("index"), f"[{r.get('lo')}, {r.get('hi')})", w] for r, w in zip(m.get("ranges") or [], weights)]
    url = f" ({m['method_url']})" if m.get("method_url") else ""
    blocks: list = [("p", f"Method `{m.get('method')}`{url}: {m.get('summary') or ''}; the range models' "
                          f"{'EMA' if m.get('use_ema', True) else 'raw'} weights, weights low t first "
                          f"[{', '.join(fmt(w) for w in weights)}]."),
                    ("table", ["range", "timesteps", "weight"], rows)]
    search = m.get("search")
    if search:
        best = search.get("best") or {}
        blocks.append(("p", f"Weights searched: {search.get('strategy')}, objective {search.get('objective')} (lower "
                            f"is better), {search.get('evaluations')} merges scored in {fmt(search.get('seconds'))} s; "
                            f"best score {fmt(best.get('score'))}."))
        top = sorted(search.get("candidates") or [], key=lambda c: c["score"])[:5]
        blocks.append(("table", ["rank", "weights", "score"],
                       [[k + 1, ", ".join(fmt(w) for w in c["weights"]), c["score"]] for k, c in enumerate(top)]))
        if "search" in d["images"]:
            blocks.append(("images", [("search", "every candidate's score (merged/merge-search.png)")]))
    return blocks


def _training_blocks(d: dict) -> list:
    if not d["training"]:
        return [("p", "No range is trained yet.")]
    rows = [[t["index"], f"[{t['lo']}, {t['hi']})", t["steps"], t["loss"], t["seconds"],
             "finished" if t["finished"] else "not finished"] for t in d["training"]]
    blocks: list = [("table", ["range", "timesteps", "steps", "final loss", "seconds", "status"], rows),
                    ("p", "Per range: the loss with its denoising and consistency terms, the gradient norm, and the "
                          "fraction of timesteps drawn inside the range (metrics.jsonl).")]
    blocks += [("images", [(f"train-{t['index']}", f"range {t['index']}")]) for t in d["training"]
               if f"train-{t['index']}" in d["images"]]
    previews = [(f"preview-{t['index']}", f"range {t['index']}: {t['preview'].stem}") for t in d["training"]
                if f"preview-{t['index']}" in d["images"]]
    if previews:
        blocks += [("p", "The latest training preview of each range (EMA weights, fixed seeds):"),
                   ("images", previews)]
    return blocks


def _ranges_blocks(d: dict) -> list:
    r = d["ranges"]
    if r is None:
        return [("p", "No ranges yet.")]
    blocks: list = [("p", f"{len(r['ranges'])} ranges of [0, {r.get('T')}), strategy {r.get('strategy')} "
                          f"(ranges.json)."),
                    ("table", ["range", "lo", "hi", "timesteps"],
                     [[x["index"], x["lo"], x["hi"], x["hi"] - x["lo"]] for x in r["ranges"]])]
    s = d["gradients"]["summary"] or {}
    if "gradients" in d["images"]:
        blocks.append(("images", [("gradients", "cosine similarity of the loss gradients across timesteps "
                                   "(analysis/)" + (f"; mean over adjacent bins {fmt(s.get('adjacent_mean'))}, over "
                                                    f"bins more than T/2 apart {fmt(s.get('distant_mean'))}"
                                                    if s else ""))]))
    else:
        blocks.append(("p", f"No gradient analysis: `deme analyze-gradients {d['recipe_arg']}` draws where the "
                            f"timesteps' gradients conflict (optional)."))
    return blocks


ENV_KEYS = ("python", "deme", "torch", "diffusers", "accelerate", "clean-fid", "platform", "cpu", "cpus", "gpus")


def _provenance_blocks(d: dict) -> list:
    recorded = d["run_environment"] or next((t["environment"] for t in d["training"] if t["environment"]), None)
    where = "run.json" if d["run_environment"] else "ranges/<i>/final/deme.json"
    cols = ([f"recorded ({where})"] if recorded else []) + ["where this report was written"]
    envs = ([recorded] if recorded else []) + [d["environment"]]

    def show(v):
        return (", ".join(v) or "none") if isinstance(v, list) else v

    blocks: list = [("table", ["", *cols], [[k] + [show(e.get(k)) for e in envs] for k in ENV_KEYS
                                            if any(e.get(k) is not None for e in envs)])]
    rows = [[what, seconds, f"`{src}`"] for what, seconds, src in times(d)]
    blocks.append(("table", ["time", "seconds", "recorded in"], rows) if rows else ("p", "No times recorded yet."))
    return blocks


def sections(d: dict) -> list[tuple[str, list]]:
    recipe = [("code", "toml", d["recipe_toml"])] if d["recipe_toml"] else [("p", "No recipe recorded.")]
    stale = [("Stale results: not of the models on disk now", _stale_blocks(d))] if d["stale"] else []
    return [("Which model to take away", _take_away_blocks(d)), ("Evaluation", _eval_blocks(d)), *stale,
            ("Samples", _samples_blocks(d)), ("Merge", _merge_blocks(d)),
            ("Training", _training_blocks(d)), ("Ranges", _ranges_blocks(d)),
            ("Provenance: versions, hardware, time", _provenance_blocks(d)),
            (f"Recipe ({d['recipe_file'] or 'as given'})", recipe)]


# --- HTML -----------------------------------------------------------------------------------------------------------

def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text)))


def _cell(v: Any) -> str:
    return _inline(fmt(v) if not isinstance(v, str) else v)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _html_block(block: tuple, images: dict) -> str:
    kind = block[0]
    if kind == "p":
        return f"<p>{_inline(block[1])}</p>"
    if kind == "list":
        return "<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in block[1]) + "</ul>"
    if kind == "table":
        head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
        rows = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in block[2])
        return f"<table><tr>{head}</tr>{rows}</table>"
    if kind == "images":
        figs = "".join(f'<figure><img src="{_data_uri(images[k])}" alt="{html.escape(cap)}">'
                       f"<figcaption>{_inline(cap)}</figcaption></figure>" for k, cap in block[1] if k in images)
        return f'<div class="images">{figs}</div>'
    if kind == "code":
        lines = block[2].count("\n") + 1
        return (f"<details><summary>{lines} lines</summary><pre><code>{html.escape(block[2])}</code></pre>"
                f"</details>")
    raise ValueError(f"Unknown report block '{kind}'")


def render_html(d: dict, images: dict[str, Path]) -> str:
    d = {**d, "images": images}
    body = [f"<h1>deme report: {html.escape(d['name'])}</h1>",
            f"<p>Run directory <code>{html.escape(d['run'])}</code>, report written {d['written']}.</p>"]
    if d["missing"]:
        body.append('<div class="missing"><p>Not in this run yet:</p><ul>' +
                    "".join(f"<li>{_inline(m)}</li>" for m in d["missing"]) + "</ul></div>")
    for title, blocks in sections(d):
        body.append(f"<h2>{html.escape(title)}</h2>")
        body += [_html_block(b, images) for b in blocks]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>deme report: {html.escape(d['name'])}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# --- Markdown -------------------------------------------------------------------------------------------------------

def _md_cell(v: Any) -> str:
    return (fmt(v) if not isinstance(v, str) else v).replace("|", "\\|").replace("\n", " ")


def _md_block(block: tuple, images: dict[str, str]) -> str:
    kind = block[0]
    if kind == "p":
        return block[1]
    if kind == "list":
        return "\n".join(f"- {x}" for x in block[1])
    if kind == "table":
        return "\n".join(["| " + " | ".join(_md_cell(h) for h in block[1]) + " |",
                          "|" + "---|" * len(block[1])] +
                         ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in block[2]])
    if kind == "images":
        return "\n".join(f"![{cap}]({images[k]})  \n*{cap}*\n" for k, cap in block[1] if k in images)
    if kind == "code":
        return f"```{block[1]}\n{block[2].rstrip()}\n```"
    raise ValueError(f"Unknown report block '{kind}'")


def render_markdown(d: dict, images: dict[str, str]) -> str:
    """images: key -> file name in report/."""
    d = {**d, "images": images}
    out = [f"# deme report: {d['name']}", "", f"Run directory `{d['run']}`, report written {d['written']}.", ""]
    if d["missing"]:
        out += ["**Not in this run yet:**", ""] + [f"- {m}" for m in d["missing"]] + [""]
    for title, blocks in sections(d):
        out += [f"## {title}", ""]
        for b in blocks:
            out += [_md_block(b, images), ""]
    return "\n".join(out)


def step_summary(d: dict, html_file: Optional[Path] = None) -> str:
    """The short Markdown for a CI job's summary: which model to take away, the eval table (current numbers only),
    the times, what is missing or stale."""
    out = [f"### deme: {d['name']}", ""]
    if d["take_away"] is not None:
        out += [f"Verdict: {d['take_away']['verdict']}.", "",
                _md_block(("table", d["take_away"]["header"], d["take_away"]["rows"]), {}), ""]
    if d["eval"]:
        out += [_md_block(b, {}) + "\n" for b in [_eval_table(d["eval"])] + _fid_note(d["eval"])]
    rows = [[what, seconds] for what, seconds, _ in times(d)]
    if rows:
        out += [_md_block(("table", ["time", "seconds"], rows), {}), ""]
    out += [f"- {m}" for m in d["missing"]] + ([""] if d["missing"] else [])
    if html_file is not None:
        out += [f"Full report: `{html_file}`", ""]
    return "\n".join(out) + "\n"
