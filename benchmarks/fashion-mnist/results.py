"""Collect the Fashion-MNIST benchmark's eval/*.json into one Markdown table (run.py calls it at the end).

    python benchmarks/fashion-mnist/results.py                               # runs/fmnist-bench -> RESULTS.md
    python benchmarks/fashion-mnist/results.py --out runs/fmnist-bench-smoke # -> runs/fmnist-bench-smoke/RESULTS-smoke.md

One row per (run dir, model): the row's meaning (paper Table 1 / Table 3), FID, KID, number of images, sampler, the
merge weights (merged rows), the exact `deme run` command and the hardware that ran it (command.json, written by
run.py). A block between <!-- notes:begin --> and <!-- notes:end --> in an existing table (the reading of the
numbers, written by hand) is kept when the table is rebuilt. A benchmark folder made with --smoke (benchmark.json
"smoke": true) is never written to RESULTS.md: its table goes to <out>/RESULTS-smoke.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"

# (recipe, model) -> row label, in table order
ROWS = [
    ("n1-all-timesteps", "base", "(a) base: pretrained, not finetuned"),
    ("n1-all-timesteps", "range:0", "(b) finetuned on all timesteps (N = 1, no DeMe technique)"),
    ("deme", "ensemble", "(c) DeMe N = 4, ensemble (before merge)"),
    ("deme", "merged", "(d) DeMe N = 4, merged, searched weights"),
    ("ablation-sampling", "ensemble", "Table 3: N = 4, prob. sampling only, ensemble"),
    ("ablation-sampling", "merged", "Table 3: N = 4, prob. sampling only, merged"),
    ("ablation-consistency", "ensemble", "Table 3: N = 4, + consistency loss, ensemble"),
    ("ablation-consistency", "merged", "Table 3: N = 4, + consistency loss, merged"),
    ("n1-projection", "range:0", "Table 3: N = 1, + channel-wise projection only"),
]


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


def collect(out: Path) -> list[dict]:
    """Rows for every run dir under `out` that holds eval/*.json (seed variants `<recipe>-seed<s>` included)."""
    rows = []
    labels = {(r, m): (i, lab) for i, (r, m, lab) in enumerate(ROWS)}
    for run_dir in sorted(p for p in out.iterdir() if (p / "eval").is_dir()):
        m = re.fullmatch(r"(.+?)(?:-seed(\d+))?", run_dir.name)
        recipe, seed = m.group(1), int(m.group(2) or 0)
        cmd = _read(run_dir / "command.json") or {}
        merge = _read(run_dir / "merged" / "merge.json") or {}
        runrec = _read(run_dir / "run.json") or {}
        calls = cmd.get("calls") or []
        hw = list(dict.fromkeys(c.get("hardware") for c in calls if c.get("hardware")))
        stages: dict = {}   # seconds per stage, summed over every run.py call (skipped work costs a little too)
        for c in calls:
            for k, v in (c.get("stages") or {}).items():
                stages[k] = stages.get(k, 0.0) + (v or 0.0)
        if not calls:       # run dir not made by run.py: the last call's times from run.json
            stages = {k: v.get("seconds") for k, v in (runrec.get("stages") or {}).items()}
        for f in sorted((run_dir / "eval").glob("*.json")):
            ev = _read(f)
            if not ev or "model" not in ev:
                continue
            order, label = labels.get((recipe, ev["model"]), (len(ROWS), f"{recipe}: {ev['model']}"))
            search = merge.get("search") or {}
            rows.append({
                "order": (seed, order), "label": label + (f" (seed {seed})" if seed else ""),
                "run": run_dir.name, "model": ev["model"],
                "fid": (ev.get("metrics") or {}).get("fid"), "kid": (ev.get("metrics") or {}).get("kid"),
                "images": ev.get("num_images"), "reference": (ev.get("reference") or {}),
                "sampler": _sampler(ev.get("sampler") or {}),
                "weights": merge.get("weights") if ev["model"] == "merged" else None,
                "search": (f"{search.get('strategy')}/{search.get('objective')}, {search.get('evaluations')} merges"
                           if ev["model"] == "merged" and search else None),
                "command": cmd.get("command"), "hardware": " + ".join(hw) if hw else None, "stages": stages,
                "calls": len(calls),
            })
    rows.sort(key=lambda r: r["order"])
    return rows


def _fmt(x, digits):
    return "-" if x is None else f"{x:.{digits}f}"


def render(out: Path, rows: list[dict], bench: dict) -> str:
    smoke = bool(bench.get("smoke"))
    lines = ["# Fashion-MNIST reproduction benchmark: results" + (" (SMOKE TEST: tiny sizes, the numbers mean "
             "nothing)" if smoke else ""), ""]
    lines += [f"Produced by `{bench.get('command', '?')}` (started {bench.get('started', '?')}); benchmark folder "
              f"`{out}`. Plan, settings and costs: `benchmarks/fashion-mnist/PLAN.md`.", ""]
    ref = next((r["reference"] for r in rows if r["reference"]), {})
    if ref:
        lines += [f"Reference for FID/KID: {json.dumps(ref, default=str)[:300]}", ""]
    lines += ["| row | FID | KID | images | sampler | merge weights | run dir | hardware |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = ", ".join(f"{x:g}" for x in r["weights"]) if r["weights"] else ""
        if r["search"]:
            w += f" ({r['search']})"
        lines.append(f"| {r['label']} | {_fmt(r['fid'], 2)} | {_fmt(r['kid'], 4)} | {r['images']} | {r['sampler']} | "
                     f"{w} | `{r['run']}` | {r['hardware'] or '?'} |")
    lines += ["", "Commands (each run dir's exact `deme run`, from the repository root) and time per stage:", ""]
    seen = set()
    for r in rows:
        if r["run"] in seen:
            continue
        seen.add(r["run"])
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items() if v is not None)
        lines += [f"- `{r['run']}`: `{r['command'] or '?'}`",
                  f"  - seconds per stage, summed over {r['calls']} call(s): {stages or '?'}"]
    return "\n".join(lines) + "\n"


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
    rows = collect(out)
    text = render(out, rows, bench)
    dest = Path(dest)
    notes = _notes(dest)
    if notes:                     # the hand-written reading of the numbers stays, right under the title
        head, _, rest = text.partition("\n\n")
        text = f"{head}\n\n{notes}\n\n{rest}"
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
