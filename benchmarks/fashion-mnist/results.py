"""Collect the Fashion-MNIST benchmark's eval/*.json into one Markdown table (run.py calls it at the end).

    python benchmarks/fashion-mnist/results.py                               # runs/fmnist-bench -> RESULTS.md
    python benchmarks/fashion-mnist/results.py --out runs/fmnist-bench-smoke # -> runs/fmnist-bench-smoke/RESULTS-smoke.md

One row per (recipe, model), with every seed of the whole finetuning side by side (run dirs <recipe> for seed 0 and
<recipe>-seed<s>): FID, KID with its subset standard deviation, and the held-out loss relative to the base (mean of
the ratios over the timestep bins), their mean over seeds and the spread (half the difference of two seeds, or
the standard deviation of more); then the loss by timestep bin of every row (mean over seeds), drawn as
loss-by-t.png next to the table; the merge weights; the exact `deme run` commands, time per stage and hardware
(command.json, written by run.py). A block between <!-- notes:begin --> and <!-- notes:end --> in an existing table
(the reading of the numbers, written by hand) is kept when the table is rebuilt. A benchmark folder made with
--smoke (benchmark.json "smoke": true) is never written to RESULTS.md: its table goes to <out>/RESULTS-smoke.md.

A benchmark folder made with `run.py --suite keep-the-gain` (issue 26) is written as a section of the file instead,
between <!-- keep-the-gain:begin --> and <!-- keep-the-gain:end --> (the first time: under the title, with the rest
of the file below it as history, unchanged): the main rows at 2,000 steps and the rows at 4x the budget, each with
paired differences per seed and the loss by timestep (keep-the-gain-loss-by-t.png), whether the gain over N = 1
grows with the budget, and objectives.py's table (<out>/objectives/objectives.md). A <!-- keep-the-gain-notes:begin
--> ... <!-- keep-the-gain-notes:end --> block inside the section is kept when it is rebuilt, and rebuilding the
earlier table keeps the section.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
BASELINES_MD = HERE / "RESULTS-baselines.md"    # issue 17's rows (run.py --only n1-min-snr,deme-lora)
LOSS_PNG = "loss-by-t.png"

# (recipe, model) -> row label, in table order
ROWS = [
    ("n1-all-timesteps", "base", "(a) base: pretrained, not finetuned"),
    ("n1-all-timesteps", "range:0", "(b) finetuned on all timesteps (N = 1, no DeMe technique)"),
    ("deme", "ensemble", "(c) DeMe N = 4, ensemble (before merge)"),
    ("deme", "merged", "(d) DeMe N = 4, merged, uniform weights"),
    ("deme-searched", "merged", "(e) DeMe N = 4, merged, searched weights"),
    ("deme", "range:0", "DeMe range model 0 alone, t in [0, 250)"),
    ("deme", "range:1", "DeMe range model 1 alone, t in [250, 500)"),
    ("deme", "range:2", "DeMe range model 2 alone, t in [500, 750)"),
    ("deme", "range:3", "DeMe range model 3 alone, t in [750, 1000)"),
    ("n1-projection", "range:0", "Table 3: N = 1, + channel-wise projection only"),
    ("ablation-sampling", "ensemble", "Table 3: N = 4, prob. sampling only, ensemble"),
    ("ablation-sampling", "merged", "Table 3: N = 4, prob. sampling only, merged (uniform)"),
    ("ablation-consistency", "ensemble", "Table 3: N = 4, + consistency loss, ensemble"),
    ("ablation-consistency", "merged", "Table 3: N = 4, + consistency loss, merged (uniform)"),
    ("n1-min-snr", "base", "(a) base, again (the Min-SNR run dir: same sampling seeds as the main table)"),
    ("n1-min-snr", "range:0", "(f) N = 1, Min-SNR-5 loss weighting"),
    ("deme-lora", "ensemble", "(g) DeMe N = 4, LoRA range models, ensemble"),
    ("deme-lora", "merged", "(h) DeMe N = 4, LoRA range models, merged, uniform weights"),
    ("deme-lora", "range:0", "DeMe LoRA range model 0 alone, t in [0, 250)"),
    ("deme-lora", "range:1", "DeMe LoRA range model 1 alone, t in [250, 500)"),
    ("deme-lora", "range:2", "DeMe LoRA range model 2 alone, t in [500, 750)"),
    ("deme-lora", "range:3", "DeMe LoRA range model 3 alone, t in [750, 1000)"),
]
MAIN = {"(a)", "(b)", "(c)", "(d)", "(e)"}


def hardware(threads=None) -> str:
    """One line: CPU (or GPU) model, core count, torch version and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    try:
        import torch

        if torch.cuda.is_available():
            desc = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}); host: {desc}"
        else:
            desc = f"CPU only: {desc}, {threads or os.environ.get('OMP_NUM_THREADS') or torch.get_num_threads()} " \
                   f"torch threads"
        desc += f"; torch {torch.__version__}"
    except ImportError:
        pass
    return desc


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _sampler(s: dict) -> str:
    if not s:
        return "?"
    eta = f", eta {s['eta']}" if s.get("eta") not in (None, 0, 0.0) else ""
    return f"{str(s.get('scheduler', '?')).upper()}-{s.get('steps')}{eta}, {s.get('precision')}"


def stage_seconds(calls: list[dict]) -> dict:
    """Seconds per stage of the work a run dir's run.py calls did. Each call records run.json's stage times after it,
    and run.json keeps, for a stage a call found done and kept, the seconds of the call that did its work: a value
    that the previous call recorded for the same stage is that same work, counted once (a resumed run dir is not
    charged its finished stages again per call)."""
    total: dict = {}
    last: dict = {}
    for c in calls:
        for k, v in (c.get("stages") or {}).items():
            if v is not None and v != last.get(k):
                total[k] = total.get(k, 0.0) + v
            last[k] = v
    return total


def collect(out: Path) -> list[dict]:
    """One entry per (run dir, model) with eval/*.json (seed variants `<recipe>-seed<s>` included)."""
    found = []
    for run_dir in sorted(p for p in out.iterdir() if (p / "eval").is_dir()):
        m = re.fullmatch(r"(.+?)(?:-seed(\d+))?", run_dir.name)
        recipe, seed = m.group(1), int(m.group(2) or 0)
        cmd = _read(run_dir / "command.json") or {}
        merge = _read(run_dir / "merged" / "merge.json") or {}
        runrec = _read(run_dir / "run.json") or {}
        calls = cmd.get("calls") or []
        hw = list(dict.fromkeys(c.get("hardware") for c in calls if c.get("hardware")))
        stages = stage_seconds(calls)
        if not calls:       # run dir not made by run.py: the last call's times from run.json
            stages = {k: v.get("seconds") for k, v in (runrec.get("stages") or {}).items()}
        for f in sorted((run_dir / "eval").glob("*.json")):
            ev = _read(f)
            if not ev or "model" not in ev:
                continue
            metrics = ev.get("metrics") or {}
            search = merge.get("search") or {}
            found.append({
                "recipe": recipe, "seed": seed, "run": run_dir.name, "model": ev["model"],
                "fid": metrics.get("fid"), "kid": metrics.get("kid"), "kid_std": metrics.get("kid_std"),
                "loss_ratio": metrics.get("loss_ratio"), "loss_by_t": ev.get("loss_by_t"),
                "images": ev.get("num_images"), "reference": (ev.get("reference") or {}),
                "sampler": _sampler(ev.get("sampler") or {}),
                "weights": merge.get("weights") if ev["model"] == "merged" else None,
                "search": (f"{search.get('strategy')}/{search.get('objective')}, {search.get('evaluations')} merges"
                           if ev["model"] == "merged" and search else None),
                "command": cmd.get("command"), "hardware": " + ".join(hw) if hw else None, "stages": stages,
                "calls": len(calls),
            })
    return found


def rows(found: list[dict], order_rows: list = ROWS, others: bool = True) -> list[dict]:
    """The table's rows: one per (recipe, model), its seeds in order, in `order_rows` order (others after, unless
    not `others`)."""
    order = {(r, m): (i, label) for i, (r, m, label) in enumerate(order_rows)}
    grouped: dict = {}
    for e in found:
        grouped.setdefault((e["recipe"], e["model"]), []).append(e)
    out = []
    for key, es in grouped.items():
        if key not in order and not others:
            continue
        i, label = order.get(key, (len(order_rows), f"{key[0]}: {key[1]}"))
        out.append({"order": i, "label": label, "recipe": key[0], "model": key[1],
                    "seeds": sorted(es, key=lambda e: e["seed"])})
    return sorted(out, key=lambda r: (r["order"], r["label"]))


def mean_spread(values: list) -> tuple:
    """(mean, spread) over seeds: half the difference of two values, the sample standard deviation of more."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    if len(v) == 1:
        return v[0], None
    return statistics.fmean(v), (abs(v[0] - v[1]) / 2 if len(v) == 2 else statistics.stdev(v))


def _fmt(x, digits):
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(values, digits, scale=1.0):
    m, s = mean_spread([None if v is None else v * scale for v in values])
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + ("" if s is None else f" ± {s:.{digits}f}")


def render(out: Path, found: list[dict], bench: dict) -> str:
    smoke = bool(bench.get("smoke"))
    table = rows(found)
    seeds = sorted({e["seed"] for e in found})
    lines = ["# Fashion-MNIST reproduction benchmark: results" + (" (SMOKE TEST: tiny sizes, the numbers mean "
             "nothing)" if smoke else ""), ""]
    lines += [f"Produced by `{bench.get('command', '?')}` (started {bench.get('started', '?')}, scale "
              f"{bench.get('scale', '?')}); benchmark folder `{out}`. Plan, settings and costs: "
              f"`benchmarks/fashion-mnist/PLAN.md`.", ""]
    ref = next((e["reference"] for e in found if e["reference"]), {})
    if ref:
        lines += [f"Reference for FID/KID: {json.dumps(ref, default=str)[:300]}", ""]
    lines += [f"FID, KID (x 1000, with the standard deviation of its subset estimates) and the held-out loss relative "
              f"to the base (mean over {_bins(found)} timestep bins of the loss ratio; 1 = the base) for each seed "
              f"of the whole finetuning ({', '.join(map(str, seeds))}), and their mean ± spread (half the "
              f"difference of the seeds).", ""]
    lines += _metric_table(table, seeds)
    lines += _paired_table(table, seeds)
    lines += _loss_table(table)
    lines += _searches(table)
    lines += _provenance(found)
    return "\n".join(lines) + "\n"


def _metric_table(table: list[dict], seeds: list) -> list[str]:
    """| row | FID per seed | mean | KID per seed | mean | loss / base per seed | mean | images | merge weights |"""
    s_cols = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| row | FID {s_cols} | FID mean | KID x1000 {s_cols} | KID mean | loss / base {s_cols} | "
             f"loss mean | images | merge weights |",
             "|---|" + "---|" * (3 * len(seeds) + 3) + "---|---|"]
    for r in table:
        by = {e["seed"]: e for e in r["seeds"]}
        fid = [by[s]["fid"] if s in by else None for s in seeds]
        kid = [by[s]["kid"] if s in by else None for s in seeds]
        loss = [by[s]["loss_ratio"] if s in by else None for s in seeds]
        kid_cells = [("-" if s not in by or by[s]["kid"] is None else
                      f"{1000 * by[s]['kid']:.2f}" + (f" ± {1000 * by[s]['kid_std']:.2f}" if by[s]["kid_std"]
                                                       is not None else "")) for s in seeds]
        w = "; ".join(f"s{e['seed']}: " + ", ".join(f"{x:.3g}" for x in e["weights"]) for e in r["seeds"]
                      if e["weights"])
        images = "/".join(sorted({str(e["images"]) if e["images"] else "loss only" for e in r["seeds"]}))
        lines.append(f"| {r['label']} | " + " | ".join(_fmt(x, 2) for x in fid) + f" | {_ms(fid, 2)} | "
                     + " | ".join(kid_cells) + f" | {_ms(kid, 2, 1000)} | " + " | ".join(_fmt(x, 4) for x in loss)
                     + f" | {_ms(loss, 4)} | {images} | {w} |")
    return lines


def _searches(table: list[dict]) -> list[str]:
    searches = [e for r in table for e in r["seeds"] if e["search"]]
    if not searches:
        return []
    return ["", "Weight searches: " + "; ".join(f"`{e['run']}` {e['search']}" for e in searches)
            + " (every candidate and its score: `<run dir>/merged/merge.json`, plotted in `merged/merge-search.png`)."]


def _provenance(found: list[dict]) -> list[str]:
    """Samplers, hardware, and each run dir's exact `deme run` with its seconds per stage."""
    lines = ["", "Samplers: " + "; ".join(sorted({e["sampler"] for e in found if e["images"]})) + ". Hardware: "
              + "; ".join(sorted({e["hardware"] for e in found if e["hardware"]})), ""]
    lines += ["Commands (each run dir's exact `deme run`, from the repository root) and time per stage:", ""]
    seen = set()
    for e in sorted(found, key=lambda e: (e["seed"], e["run"])):
        if e["run"] in seen:
            continue
        seen.add(e["run"])
        stages = ", ".join(f"{k} {v:.0f}" for k, v in e["stages"].items() if v is not None)
        lines += [f"- `{e['run']}`: `{e['command'] or '?'}`",
                  f"  - seconds per stage of the work, over {e['calls']} call(s): {stages or '?'}"]
    return lines


def paired(table: list[dict], seeds: list, ref_label: str, key: str) -> dict:
    """{row label: [model's value - the reference row's value, per seed (None where either is missing)]}: the same
    seed's models share the sampling noise (image k from seed sample.seed + k), so these differences carry less
    noise than the rows' own spread over seeds."""
    by_label = {r["label"]: {e["seed"]: e for e in r["seeds"]} for r in table}
    ref = next((v for label, v in by_label.items() if label.startswith(ref_label)), {})
    out = {}
    for label, by in by_label.items():
        if label.startswith(ref_label):
            continue
        diffs = [by[s][key] - ref[s][key] if s in by and s in ref and by[s][key] is not None
                 and ref[s][key] is not None else None for s in seeds]
        if any(d is not None for d in diffs):
            out[label] = diffs
    return out


def _paired_table(table: list[dict], seeds: list, refs: tuple = (("(a)", "(a)"), ("(b)", "(b)")),
                  what: str = "(a) the base, or minus (b) N = 1") -> list[str]:
    """Paired differences of FID and KID to each reference row (label prefix, column name) of `refs`."""
    (ra, na), (rb, nb) = refs
    cols = [(ra, "fid", 1.0, 2), (rb, "fid", 1.0, 2), (ra, "kid", 1000.0, 2), (rb, "kid", 1000.0, 2)]
    diffs = [paired(table, seeds, ref, key) for ref, key, _, _ in cols]
    labels = [r["label"] for r in table if any(r["label"] in d for d in diffs)]
    if not labels:
        return []
    s_cols = ", ".join(f"seed {s}" for s in seeds)
    lines = ["", f"Paired differences (< 0: better): each row minus {what}, on the same "
                 f"seed, whose models start from the same sampling noise; per seed ({s_cols}), then mean ± spread. "
                 f"A difference is beyond the seed spread when its mean is larger than its spread and both seeds "
                 f"agree in sign.", "",
             f"| row | FID - {na} | FID - {nb} | KID x1000 - {na} | KID x1000 - {nb} |", "|---|---|---|---|---|"]
    for label in labels:
        cells = []
        for (ref, key, scale, digits), d in zip(cols, diffs):
            v = d.get(label)
            if v is None:
                cells.append("-")
                continue
            per = ", ".join(_fmt(None if x is None else x * scale, digits) for x in v)
            cells.append(f"{per} ({_ms(v, digits, scale)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _bins(found: list[dict]) -> int:
    return next((len(e["loss_by_t"]["bins"]) for e in found if e.get("loss_by_t")), 0)


def mean_curves(table: list[dict]) -> dict:
    """{row label: (bins, mean ratio per bin over seeds)} for rows with a loss by timestep."""
    curves = {}
    for r in table:
        recs = [e["loss_by_t"] for e in r["seeds"] if e.get("loss_by_t")]
        if recs:
            curves[r["label"]] = (recs[0]["bins"], [statistics.fmean(x) for x in zip(*(rec["ratio"] for rec in recs))])
    return curves


def _loss_table(table: list[dict], png: str = LOSS_PNG) -> list[str]:
    curves = mean_curves(table)
    if not curves:
        return []
    bins = next(iter(curves.values()))[0]
    lines = ["", f"Held-out loss by timestep bin, relative to the base (mean over seeds; < 1: better than the base), "
             f"drawn in `{png}`:", "",
             "| row | " + " | ".join(f"[{lo}, {hi})" for lo, hi in bins) + " |", "|---|" + "---|" * len(bins)]
    for label, (_, ratio) in curves.items():
        lines.append(f"| {label} | " + " | ".join(f"{x:.4f}" for x in ratio) + " |")
    return lines


def plot(table: list[dict], path: Path) -> Path | None:
    """loss-by-t.png: the main rows (a)-(e), and the range models and Table 3 rows, ratio to the base against t."""
    curves = mean_curves(table)
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110, layout="constrained", sharey=True)
    for ax, main in zip(axes, (True, False)):
        ax.axhline(1.0, color="k", lw=1, ls="--")
        for label, (bins, ratio) in curves.items():
            if (label[:3] in MAIN) != main or label.startswith("(a)"):
                continue
            ax.plot([(lo + hi) / 2 for lo, hi in bins], ratio, "o-", ms=3, label=label)
        ax.set_xlabel("timestep t (bin centre)")
        ax.set_title("rows (b)-(e)" if main else "range models alone and Table 3 rows", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out loss / base model's loss (mean over seeds)")
    fig.savefig(path)
    plt.close(fig)
    return path


# --- issue 26 (run.py --suite keep-the-gain): a section of RESULTS.md; the tables above it stay as history ---------

SECTION_BEGIN, SECTION_END = "<!-- keep-the-gain:begin -->", "<!-- keep-the-gain:end -->"
SECTION = re.compile(re.escape(SECTION_BEGIN) + ".*?" + re.escape(SECTION_END), re.S)
SECTION_NOTES = re.compile(r"<!-- keep-the-gain-notes:begin -->.*?<!-- keep-the-gain-notes:end -->", re.S)
HISTORY = "## Earlier: 1,000 samples per model, 2,000 steps (issue 12), kept as it was"
SECTION_PNG = "keep-the-gain-loss-by-t.png"
RANGES = ["t in [0, 250)", "t in [250, 500)", "t in [500, 750)", "t in [750, 1000)"]
# (recipe, model, label): the main rows at 2,000 total finetuning steps, then at 4x the budget
KTG_ROWS = [
    ("n1-all-timesteps", "base", "(a) base: pretrained, not finetuned"),
    ("n1-all-timesteps", "range:0", "(b) N = 1 on all timesteps, 2,000 steps"),
    ("deme", "ensemble", "(c) DeMe N = 4 x 500 steps, ensemble (= the routed model)"),
    ("deme", "merged", "(d) DeMe N = 4 x 500 steps, merged, uniform weights"),
    ("deme-chosen", "merged", "(f) DeMe N = 4 x 500 steps, merged, weights searched by item 1's objective"),
    ("deme-lora", "ensemble", "(g) DeMe LoRA N = 4 x 500 steps, ensemble (= the routed model)"),
    *[("deme", f"range:{i}", f"DeMe range model {i} alone, {r}") for i, r in enumerate(RANGES)],
    *[("deme-lora", f"range:{i}", f"DeMe LoRA range model {i} alone, {r}") for i, r in enumerate(RANGES)],
]
KTG_4X_ROWS = [
    ("n1-all-timesteps", "base", "(a) base: pretrained, not finetuned"),
    ("n1-all-timesteps-4x", "range:0", "(b4) N = 1 on all timesteps, 8,000 steps"),
    ("deme-4x", "ensemble", "(c4) DeMe N = 4 x 2,000 steps, ensemble (= the routed model)"),
    ("deme-4x", "merged", "(d4) DeMe N = 4 x 2,000 steps, merged, uniform weights"),
    ("deme-4x-chosen", "merged", "(f4) DeMe N = 4 x 2,000 steps, merged, weights searched by item 1's objective"),
    *[("deme-4x", f"range:{i}", f"DeMe 4x range model {i} alone, {r}") for i, r in enumerate(RANGES)],
]


def _growth_table(main: list[dict], four: list[dict], seeds: list) -> list[str]:
    """The ensemble's lead over N = 1, and the single models', at 2,000 and at 8,000 total steps (paired, per seed:
    mean ± spread)."""
    pairs = [("(c)", "(c4)", "ensemble"), ("(d)", "(d4)", "uniform merge"), ("(f)", "(f4)", "merge of item 1's "
                                                                                          "objective")]
    cells = {}
    for key, scale, digits in (("fid", 1.0, 2), ("kid", 1000.0, 2), ("loss_ratio", 1.0, 4)):
        d2, d8 = paired(main, seeds, "(b)", key), paired(four, seeds, "(b4)", key)
        for a, b, _ in pairs:
            for label, d, tag in [(x, d2, a) for x in d2 if x.startswith(a + " ")] + \
                                 [(x, d8, b) for x in d8 if x.startswith(b + " ")]:
                cells[(tag, key)] = _ms(d[label], digits, scale)
    if not cells:
        return []
    lines = ["", "Does the gain grow with the budget? Each model minus N = 1 at the same budget, paired per seed "
                 "(mean ± spread over seeds; < 0: better than N = 1):", "",
             "| model | FID - N = 1, 2,000 steps | 8,000 steps | KID x1000 - N = 1, 2,000 steps | 8,000 steps | "
             "loss / base - N = 1's, 2,000 steps | 8,000 steps |", "|---|---|---|---|---|---|---|"]
    for a, b, name in pairs:
        row = [cells.get((t, k), "-") for k in ("fid", "kid", "loss_ratio") for t in (a, b)]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def render_section(out: Path, found: list[dict], bench: dict) -> str:
    """The keep-the-gain section (between SECTION_BEGIN and SECTION_END; its own notes block is kept by write)."""
    main, four = rows(found, KTG_ROWS, others=False), rows(found, KTG_4X_ROWS, others=False)
    seeds = sorted({e["seed"] for e in found})
    images = sorted({e["images"] for e in found if e["images"]})
    ref = next((e["reference"].get("num_images") for e in found if e["reference"]), None)
    lines = [SECTION_BEGIN, "## Keep the gain: 5,000 samples per model, and 4x the budget (issue 26)", "",
             f"Produced by `{bench.get('command', '?')}` (started {bench.get('started', '?')}, scale "
             f"{bench.get('scale', '?')}); benchmark folder `{out}`. "
             f"{'/'.join(f'{n:,}' for n in images) or '?'} samples per model; FID and KID (x 1000, with the standard "
             f"deviation of its subset estimates) against all {f'{ref:,}' if ref else '?'} test images; the held-out "
             f"loss by timestep on "
             f"the same images, as a ratio to the base (mean over {_bins(found)} bins); seeds "
             f"{', '.join(map(str, seeds))} of the whole finetuning and their mean ± spread. Row (f)'s weights were "
             f"searched on `holdout-2k/` (held-out training images), never on the test set.", "",
             "### At 2,000 total finetuning steps", ""]
    lines += _metric_table(main, seeds) + _paired_table(main, seeds) + _loss_table(main, SECTION_PNG)
    if any(not r["label"].startswith("(a)") for r in four):       # not the base (a) alone, which both lists hold
        lines += ["", "### At 4x the budget: 8,000 total finetuning steps (N = 1 x 8,000; DeMe N = 4 x 2,000)", ""]
        lines += _metric_table(four, seeds)
        lines += _paired_table(four, seeds, (("(a)", "(a)"), ("(b4)", "(b4)")), "(a) the base, or minus (b4) N = 1 "
                               "at 8,000 steps")
        lines += _loss_table(four, SECTION_PNG) + _growth_table(main, four, seeds)
    study = Path(out) / "objectives" / "objectives.md"
    if study.is_file():
        lines += ["", "### Which search objective ranks merges like FID (item 1): Spearman rank correlation and cost",
                  "", study.read_text().rstrip()]
    lines += _searches(main + four)
    lines += _provenance(found) + [SECTION_END]
    return "\n".join(lines) + "\n"


def plot_section(found: list[dict], path: Path) -> Path | None:
    """The keep-the-gain rows' loss by timestep: 2,000 steps left, 8,000 right (mean over seeds)."""
    panels = [("2,000 total steps", mean_curves(rows(found, KTG_ROWS, others=False))),
              ("8,000 total steps (4x)", mean_curves(rows(found, KTG_4X_ROWS, others=False)))]
    panels = [(title, c) for title, c in panels if any(not label.startswith("(a)") for label in c)]  # not (a) alone
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), dpi=110, layout="constrained",
                             sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (title, curves) in zip(axes, panels):
        ax.axhline(1.0, color="k", lw=1, ls="--")
        for label, (bins, ratio) in curves.items():
            if not label.startswith("(a)"):
                ax.plot([(lo + hi) / 2 for lo, hi in bins], ratio, "o-" if label.startswith("(") else ":",
                        ms=3, label=label)
        ax.set_xlabel("timestep t (bin centre)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("held-out loss / base model's loss (mean over seeds)")
    fig.savefig(path)
    plt.close(fig)
    return path


def place_section(text: str, section: str) -> str:
    """`text` with `section` in place of its keep-the-gain block (its notes block kept), or, the first time, right
    under the title, with the rest of the file below a heading that marks it as history."""
    old = SECTION.search(text)
    notes = SECTION_NOTES.search(old.group(0)) if old else None
    if notes:
        head, _, rest = section.partition("\n\n")
        section = f"{head}\n\n{notes.group(0)}\n\n{rest}"
    if old:
        return text[:old.start()] + section.rstrip("\n") + text[old.end():]
    title, _, rest = text.partition("\n\n")
    if not title.startswith("# "):
        return section + ("\n" + text if text else "")
    return f"{title}\n\n{section.rstrip()}\n\n{HISTORY}\n\n{rest}" if rest else f"{title}\n\n{section}"


NOTES = re.compile(r"<!-- notes:begin -->.*?<!-- notes:end -->", re.S)


def _notes(dest: Path) -> str:
    """The <!-- notes:begin --> ... <!-- notes:end --> block of an existing table (kept when it is rebuilt)."""
    try:
        m = NOTES.search(Path(dest).read_text())
    except OSError:
        return ""
    return m.group(0) if m else ""


def write(out: Path, dest: Path | None = None) -> Path:
    out = Path(out)
    bench = _read(out / "benchmark.json") or {}
    smoke = bool(bench.get("smoke"))
    if dest is None:
        dest = out / "RESULTS-smoke.md" if smoke else RESULTS_MD
    if smoke and Path(dest).resolve() == RESULTS_MD.resolve():
        raise SystemExit(f"{out} holds a smoke run: its table never goes to {RESULTS_MD}")
    found = collect(out)
    dest = Path(dest)
    old = dest.read_text() if dest.is_file() else ""
    if bench.get("suite") == "keep-the-gain":     # a section of the file; the rest of it stays as it is
        plot_section(found, dest.parent / (SECTION_PNG if dest.name == "RESULTS.md" else f"{dest.stem}-{SECTION_PNG}"))
        section = render_section(out, found, bench)
        text = place_section(old or "# Fashion-MNIST reproduction benchmark: results" + (
            " (SMOKE TEST: tiny sizes, the numbers mean nothing)" if smoke else ""), section)
    else:
        text = render(out, found, bench)
        plot(rows(found), dest.parent / (LOSS_PNG if dest.name == "RESULTS.md" else f"{dest.stem}-{LOSS_PNG}"))
        notes = _notes(dest)
        if notes:                 # the hand-written reading of the numbers stays, right under the title
            head, _, rest = text.partition("\n\n")
            text = f"{head}\n\n{notes}\n\n{rest}"
        kept = SECTION.search(old)
        if kept:                  # and so does a keep-the-gain section, above it
            head, _, rest = text.partition("\n\n")
            text = f"{head}\n\n{kept.group(0)}\n\n{rest}"
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, dest)
    print(text)
    return dest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/fmnist-bench"), help="benchmark folder (run.py --out)")
    p.add_argument("--dest", type=Path, default=None,
                   help="Markdown file (default: RESULTS.md next to this script, or <out>/RESULTS-smoke.md for a smoke run)")
    args = p.parse_args(argv)
    write(args.out, args.dest)


if __name__ == "__main__":
    main()
