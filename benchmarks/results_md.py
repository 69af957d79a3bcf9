"""Markdown rows for benchmarks/RESULTS.md from the JSON files of throughput.py and sample_throughput.py.

    python benchmarks/results_md.py A.json B.json                          # print the rows
    python benchmarks/results_md.py --update benchmarks/RESULTS.md A.json   # replace the GPU or CPU block

The block a file belongs to is chosen by its device type (cuda -> GPU, cpu -> CPU); RESULTS.md marks each block
with <!-- gpu-results:begin/end --> and <!-- cpu-results:begin/end -->. Missing files are skipped.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

COMMANDS = {"throughput": "python benchmarks/throughput.py", "sample_throughput": "python benchmarks/sample_throughput.py"}


def _num(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _source(d: dict, name: str) -> str:
    """Where a table's numbers live: the run's start time and the JSON file (as kept in benchmarks/results/)."""
    when = d["created"].replace("T", " ")[:16] if d.get("created") else None
    return ", ".join(x for x in (when, f"`results/{name}`" if name else None) if x)


def throughput_md(d: dict, name: str = "") -> list[str]:
    archs = sorted({r["arch"] for r in d["rows"]}, key=[r["arch"] for r in d["rows"]].index)
    args = f" --archs {','.join(archs)}" + (" --quick" if d.get("quick") else "")
    src = _source(d, name)
    out = [f"**Training step throughput**, {d['device']} (torch {d['torch']}, diffusers {d['diffusers']}), "
           f"`{COMMANDS['throughput']}{args}`" + (f" ({src})" if src else "") + ":", "",
           "| arch | batch | variant | img/s | ms/step | peak GiB | notes |", "|---|---:|---|---:|---:|---:|---|"]
    for r in d["rows"]:
        notes = ", ".join(f"{k} {r[k]}" for k in ("precision", "compile", "fused_adamw", "teacher_dtype") if k in r)
        res = f" @{r['res']}px" if r["arch"] == "lsun256" and r["res"] != 256 else ""
        out.append(f"| {r['arch']}{res} | {r['batch']} | {r['variant']} | {_num(r['img_per_s'], 2)} | "
                   f"{_num(r['ms_per_step'])} | {_num(r.get('peak_gib'), 2)} | {notes} |")
    out.append("")
    for arch, ratios in d.get("ratios", {}).items():
        out.append(f"- {arch}: " + ", ".join(f"{k.replace('_over_', ' / ')} = **{v:.2f}x**" if k == "ours_over_authors"
                                              else f"{k.replace('_over_', ' / ')} = {v:.2f}x"
                                              for k, v in ratios.items()))
    for arch, ratios in d.get("cpu_time_ratios", {}).items():
        out.append(f"- {arch}, by process CPU time: " + ", ".join(f"{k.replace('_over_', ' / ')} = {v:.2f}x"
                                                                  for k, v in ratios.items()))
    return out + [""]


def sample_md(d: dict, name: str = "") -> list[str]:
    args = " --quick" if d.get("quick") else ""
    src = _source(d, name)
    out = [f"**Sampling throughput**, DDIM-{d['steps']}, CIFAR10 UNet, batch {d['batch']}, {d['precision']}, "
           f"{d['device']} (torch {d['torch']}), `{COMMANDS['sample_throughput']}{args}`"
           + (f" ({src})" if src else "") + ":", "",
           "| variant | img/s | warm-up batch s |", "|---|---:|---:|"]
    for r in d["rows"]:
        out.append(f"| {r['variant']} | {_num(r['img_per_s'], 2)} | {_num(r['warmup_s'])} |")
    out.append("")
    if d.get("ratios"):
        out.append("- " + ", ".join(f"{k.replace('_over_', ' / ')} = **{v:.2f}x**" for k, v in d["ratios"].items()))
    return out + [""]


RENDER = {"throughput": throughput_md, "sample_throughput": sample_md}


def render(files: list[Path]) -> dict[str, list[str]]:
    """{"gpu" | "cpu": markdown lines} of the files that exist."""
    blocks: dict[str, list[str]] = {}
    for f in files:
        if not f.is_file():
            print(f"skipped {f} (missing)", file=sys.stderr)
            continue
        d = json.loads(f.read_text())
        key = "gpu" if d.get("device_type") == "cuda" else "cpu"
        blocks.setdefault(key, []).extend(RENDER[d["benchmark"]](d, f.name))
    return blocks


def update(results: Path, blocks: dict[str, list[str]]) -> None:
    text = results.read_text()
    for key, lines in blocks.items():
        pat = re.compile(rf"(<!-- {key}-results:begin -->\n).*?(<!-- {key}-results:end -->)", re.S)
        if not pat.search(text):
            raise SystemExit(f"{results} has no <!-- {key}-results:begin/end --> block")
        text = pat.sub(lambda m: m.group(1) + "\n".join(lines).rstrip() + "\n" + m.group(2), text)
    results.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--update", type=Path, help="RESULTS.md whose GPU/CPU block to replace")
    args = ap.parse_args()
    blocks = render(args.files)
    if args.update:
        update(args.update, blocks)
    else:
        for lines in blocks.values():
            print("\n".join(lines))


if __name__ == "__main__":
    main()
