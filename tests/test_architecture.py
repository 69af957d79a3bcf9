"""The package's layout, read from its source: the engine below the commands, no import cycle (circular imports),
modules small enough to hold in your head, and one place for each fact that used to be worked out in several."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "deme_cli"
CALLERS_OF_COMMANDS = {"commands.pipeline", "commands.launch"}     # `deme run` and `deme train --launcher`
MAX_LINES = 450


def module_name(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__") or "__init__"


def imports_of(path: Path, pkg: Path = PKG) -> set[str]:
    """The deme_cli modules `path` imports, at module level and inside functions (names relative to deme_cli)."""
    name = module_name(path, pkg)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else list(package)
                stem = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "deme_cli":
                stem = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:              # `from . import ui` names a module; `from .x import f` a name in x
                found.add(".".join(stem + [alias.name]) if _is_module(stem + [alias.name], pkg)
                          else ".".join(stem))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "deme_cli":
                    found.add(".".join(alias.name.split(".")[1:]))
    return {m for m in found if m and _is_module(m.split("."), pkg)} - {name}


def _is_module(parts: list[str], pkg: Path) -> bool:
    return pkg.joinpath(*parts).with_suffix(".py").is_file() or (pkg.joinpath(*parts) / "__init__.py").is_file()


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    return {module_name(p, pkg): imports_of(p, pkg) for p in sorted(pkg.rglob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as [a, b, ..., a], or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(m: str) -> list[str] | None:
        colour[m] = "grey"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if colour.get(d) == "grey":
                return stack[stack.index(d):] + [d]
            if d not in colour:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        colour[m] = "black"
        return None

    for m in sorted(graph):
        if m not in colour:
            found = visit(m)
            if found:
                return found
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Engine modules importing commands or the CLI, and commands importing other commands (other than the pipeline
    and the launcher, which call commands)."""
    bad = []
    for m, deps in graph.items():
        for d in sorted(deps):
            if m.startswith("engine") and not d.startswith("engine"):
                bad.append(f"engine module {m} imports {d}")
            if m.startswith("commands.") and m not in CALLERS_OF_COMMANDS and d.startswith("commands.") \
                    and d != "commands":
                bad.append(f"command module {m} imports command module {d}")
            if m.startswith("commands") and d == "cli":
                bad.append(f"command module {m} imports the CLI")
    return bad


def test_no_import_cycle_and_engine_below_commands():
    graph = import_graph()
    assert {"cli", "engine.recipe", "engine.base", "commands.train", "commands.pipeline"} <= set(graph)
    assert "engine.base" in graph["commands.train"]           # the reader sees relative imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert layer_violations(graph) == []


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """The reader and the checks on a small package: a circle through an import inside a function, and an engine
    module that imports a command module."""
    pkg = tmp_path / "deme_cli"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "commands").mkdir()
    for f in ("__init__.py", "engine/__init__.py", "commands/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "engine" / "a.py").write_text("from .b import f\n")
    (pkg / "engine" / "b.py").write_text("def f():\n    from . import a\n    from ..commands.train import g\n")
    (pkg / "commands" / "train.py").write_text("from ..engine.a import f\n")
    graph = import_graph(pkg)
    assert graph["engine.a"] == {"engine.b"} and graph["engine.b"] == {"engine.a", "commands.train"}
    assert find_cycle(graph) in (["engine.a", "engine.b", "engine.a"], ["commands.train", "engine.a", "engine.b",
                                                                          "commands.train"])
    assert layer_violations(graph) == ["engine module engine.b imports commands.train"]


def test_modules_are_small():
    big = {module_name(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def test_one_place_resolves_the_base_and_picks_the_device():
    """`resolve_pretrained` is called only by base.resolve_base; torch.cuda.is_available() decides the device only in
    devices.py (processes.py counts GPUs for the launcher's slots and checkpoints.py saves the CUDA RNG state)."""
    calls, device_checks = [], []
    for p in PKG.rglob("*.py"):
        text = p.read_text()
        calls += [f"{module_name(p)}" for _ in re.finditer(r"(?<!def )resolve_pretrained\(", text)]
        if "cuda.is_available()" in text:
            device_checks.append(module_name(p))
    assert calls == ["engine.base"]
    assert set(device_checks) <= {"engine.devices", "engine.processes", "engine.checkpoints"}


def test_one_model_kind_registry_holds_task_and_denoiser():
    from deme_cli.engine.kinds import KINDS

    assert set(KINDS) == {"unconditional", "text-to-image"}
    for kind in KINDS.values():
        assert callable(kind.task) and callable(kind.denoiser)
    names = [n for p in PKG.rglob("*.py") for n in re.findall(r"^(\w*KINDS|TASKS)\s*[:=]", p.read_text(), re.M)]
    assert names == ["KINDS"]


@pytest.mark.parametrize("name", ["tiny_feature_net", "tiny_extractor"])
def test_test_only_networks_live_in_tests(name):
    assert not [p for p in PKG.rglob("*.py") if f"def {name}" in p.read_text()]
