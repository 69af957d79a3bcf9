"""Mutation run: break the engine on purpose, one targeted change at a time, and check the tests notice.

    .venv/bin/python tests/mutations/run.py                      # every mutation of tests/mutations/*.toml
    .venv/bin/python tests/mutations/run.py --only NAME [NAME..] # some of them
    .venv/bin/python tests/mutations/run.py --list               # names, files and tests, nothing run
    .venv/bin/python tests/mutations/run.py --relocate           # after moving code: point each `file` at the
                                                                 # module that now holds its `old` text

Each mutation (a [[mutation]] table of a TOML file beside this script) names a file, a text that must occur in it
exactly once, its replacement, and the test files (or node ids) that should catch it. For each one the runner copies
the checkout's tracked files (as they are on disk) to a scratch folder, applies the change there, runs
`python -m pytest -q -x <tests>` in that copy and records "killed" (a test failed) or "survived" (all passed). A
mutation whose text is missing or occurs more than once is "not applied": the code moved, so update the mutation.
The checkout itself is never changed. A run of every mutation writes tests/mutations/RESULTS.md (or --report).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deme_cli.engine.recipe import tomllib  # tomli on Python 3.10

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def load_mutations(folder: Path = HERE) -> list[dict]:
    """Every [[mutation]] of folder/*.toml, in file then table order, each tagged with its area (the file stem)."""
    out, seen = [], set()
    for f in sorted(folder.glob("*.toml")):
        for m in tomllib.loads(f.read_text())["mutation"]:
            missing = {"name", "file", "old", "new", "tests"} - m.keys()
            if missing:
                raise SystemExit(f"error: mutation {m.get('name', '?')} in {f.name} lacks {', '.join(sorted(missing))}.")
            if m["name"] in seen:
                raise SystemExit(f"error: two mutations are named {m['name']}.")
            seen.add(m["name"])
            out.append({**m, "area": f.stem})
    return out


def tracked_copy(dest: Path) -> None:
    """Copy the git-tracked files of the checkout (their current contents, untracked new tests included if staged or
    not ignored) to dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(tree: Path, m: dict) -> bool:
    path = tree / m["file"]
    text = path.read_text() if path.exists() else ""
    if text.count(m["old"]) != 1:
        return False
    path.write_text(text.replace(m["old"], m["new"], 1))
    return True


def locate(m: dict, root: Path = ROOT) -> str | None:
    """The package file that holds the mutation's `old` text exactly once (its named file first), or None when the
    text is missing or not unique in the package."""
    named = root / m["file"]
    if named.is_file() and named.read_text().count(m["old"]) == 1:
        return m["file"]
    hits = [(f, f.read_text().count(m["old"])) for f in sorted((root / "deme_cli").rglob("*.py"))]
    hits = [(f, n) for f, n in hits if n]
    if len(hits) == 1 and hits[0][1] == 1:
        return hits[0][0].relative_to(root).as_posix()
    return None


def relocate(folder: Path = HERE) -> list[str]:
    """Rewrite each TOML's `file = "..."` lines to where the `old` texts are now; returns what could not be found."""
    lost = []
    for f in sorted(folder.glob("*.toml")):
        text = f.read_text()
        for m in tomllib.loads(text)["mutation"]:
            where = locate(m)
            if where is None:
                lost.append(m["name"])
            elif where != m["file"]:
                old_line, new_line = 'file = "%s"' % m["file"], 'file = "%s"' % where
                j = text.index(old_line, text.index('name = "%s"' % m["name"]))
                text = text[:j] + new_line + text[j + len(old_line):]
        f.write_text(text)
    return lost


def run_one(base: Path, m: dict, timeout: int) -> tuple[str, float, str]:
    """(outcome, seconds, last lines of pytest's output) for one mutation, in a fresh copy of base."""
    work = base.parent / f"m-{m['name']}"
    shutil.copytree(base, work)
    try:
        if not apply(work, m):
            return "not applied", 0.0, ""
        env = {**os.environ, "PYTHONPATH": str(work), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1"}
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m["tests"]],
                               cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed (timeout)", time.time() - t0, ""
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-3:])
        return ("killed" if r.returncode != 0 else "survived"), time.time() - t0, tail
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(rows: list[tuple[dict, str, float]], path: Path | None) -> str:
    applied = [r for r in rows if r[1] != "not applied"]
    killed = [r for r in applied if r[1].startswith("killed")]
    lines = ["# Mutation run", "",
             f"Generated by `.venv/bin/python tests/mutations/run.py` ({time.strftime('%Y-%m-%d')}). "
             f"Killed {len(killed)} of {len(applied)} applied mutations"
             + (f" ({100 * len(killed) / len(applied):.0f}%)" if applied else "")
             + f"; {len(rows) - len(applied)} not applied.", "",
             "| area | mutation | outcome | s | tests | what it breaks |", "|---|---|---|---|---|---|"]
    for m, outcome, secs in rows:
        why = " ".join(m.get("note", "").split())
        lines.append(f"| {m['area']} | {m['name']} | {outcome} | {secs:.0f} | {' '.join(m['tests'])} | {why} |")
    text = "\n".join(lines) + "\n"
    if path is not None:
        path.write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", help="run only the mutations with these names")
    ap.add_argument("--area", nargs="+", help="run only the mutations of these files (stems, e.g. train)")
    ap.add_argument("--list", action="store_true", help="list the mutations and stop")
    ap.add_argument("--relocate", action="store_true", help="point each mutation's file at the module that now "
                    "holds its text, and stop")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutation before it counts as killed")
    ap.add_argument("--report", type=Path, help="markdown report to write (default: tests/mutations/RESULTS.md when "
                    "every mutation runs, none for --only/--area)")
    args = ap.parse_args()
    if args.relocate:
        lost = relocate()
        if lost:
            print(f"error: the text of {', '.join(lost)} is not found exactly once in deme_cli/; update those "
                  f"mutations by hand.", file=sys.stderr)
            return 2
        return 0
    muts = load_mutations()
    if args.only:
        unknown = set(args.only) - {m["name"] for m in muts}
        if unknown:
            print(f"error: no mutation named {', '.join(sorted(unknown))}.", file=sys.stderr)
            return 2
        muts = [m for m in muts if m["name"] in args.only]
    if args.area:
        muts = [m for m in muts if m["area"] in args.area]
    if args.list:
        for m in muts:
            print(f"{m['area']:<10} {m['name']:<32} {m['file']:<28} {' '.join(m['tests'])}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="deme-mut-") as tmp:
        base = Path(tmp) / "base"
        tracked_copy(base)
        for i, m in enumerate(muts, 1):
            outcome, secs, tail = run_one(base, m, args.timeout)
            rows.append((m, outcome, secs))
            print(f"[{i}/{len(muts)}] {m['name']}: {outcome} ({secs:.0f} s)", flush=True)
            if outcome == "survived" and tail:
                print("    " + tail.replace("\n", "\n    "), flush=True)
    path = args.report or (None if args.only or args.area else HERE / "RESULTS.md")
    text = report(rows, path)
    print(text.splitlines()[2])
    return 0 if all(r[1] != "survived" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
