"""What every `deme` command does around its work: load and check the recipe and prepare the run directory
(`prepare`, which gives the command its `Ctx`), record the recipe the work was done with, and keep the exit-code
contract (`guard`): 0 success, 2 bad input (one sentence, no traceback, nothing on disk changed), 1 a failure while
running, 128 + the signal number when stopped by one.

Like cli.py, importing this module must not import torch or diffusers.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from .engine import ui
from .engine.errors import Failed, UsageError
from .engine.interrupts import Interrupted, handle_signals


class Ctx:
    """What every command gets: the validated recipe, its run directory, and the output flags."""

    def __init__(self, recipe, as_json: bool, force: bool):
        from .engine.runs import RunDir

        self.recipe = recipe
        self.run = RunDir(recipe.out_dir)
        self.json = as_json
        self.force = force


def prepare(recipe_path: Path, sets: Optional[List[str]], out: Optional[Path], dry_run: bool, as_json: bool,
            force: bool = False) -> Optional[Ctx]:
    """Load and validate the recipe; on --dry-run print it and return None; else create the run dir."""
    from .engine.recipe import load_recipe
    from .engine.runs import ensure_writable, write_atomic

    recipe = load_recipe(recipe_path, sets, str(out) if out is not None else None)
    if dry_run:
        sys.stdout.write(recipe.to_toml())
        return None
    ensure_writable(recipe.out_dir)
    _PREPARED.append(lambda: write_atomic(recipe.out_dir / "recipe.resolved.toml", recipe.to_toml()))
    return Ctx(recipe, as_json, force)


# <run>/recipe.resolved.toml records the recipe of the last command that did work in the run directory: written when
# the command ends, unless it refused its input (then nothing on disk changes)
_PREPARED: list[Callable[[], None]] = []


def _say(style: str, label: str, message: str) -> None:
    msg = str(message).strip()
    msg = msg if msg.endswith((".", "?", "!")) else msg + "."
    ui.console.print(f"[{style}]{label}:[/{style}] {msg}", markup=True, highlight=False, soft_wrap=True)


def _record_resolved() -> None:
    while _PREPARED:
        _PREPARED.pop()()


def guard(fn: Callable[[], None]) -> None:
    """Run a command body: UsageError -> one sentence, exit 2; a run that failed for a reason one sentence explains
    (Failed) -> exit 1; SIGTERM, SIGINT or SIGUSR1 -> one line saying what was kept, exit 128 + the signal number
    (interrupts.py: long loops stop at their next safe point and save first)."""
    _PREPARED.clear()
    try:
        try:
            with handle_signals():
                fn()
        except BaseException as e:   # unless it refused its input, it did work: say with which recipe
            if not isinstance(e, UsageError) and getattr(e, "exit_code", getattr(e, "code", None)) != 2:
                _record_resolved()
            raise
        _record_resolved()
    except UsageError as e:
        _say("red", "error", e)
        raise typer.Exit(2)
    except Failed as e:
        _say("red", "failed", e)
        raise typer.Exit(1)
    except Interrupted as e:
        _say("yellow", "stopped", e)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        ui.console.print("interrupted; re-run the same command to continue where it stopped.")
        raise typer.Exit(130)


def main_process() -> bool:
    """False in the other processes of an `accelerate launch` / torchrun job: only the main one reports."""
    return int(os.environ.get("RANK", "0")) == 0
