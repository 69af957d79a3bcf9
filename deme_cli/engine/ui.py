"""Terminal output: human output on stderr (rich), machine output (--json) on stdout.

`progress()` gives a rich progress bar when stderr is a terminal and plain periodic lines otherwise, so shell
pipelines and CI logs stay readable.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table

console = Console(stderr=True, highlight=False)


def is_tty() -> bool:
    return console.is_terminal


def info(msg: str) -> None:
    """One line on stderr (not wrapped: logs and greps see whole lines)."""
    console.print(msg, soft_wrap=True)


def warn(msg: str) -> None:
    """One warning line on stderr (not wrapped)."""
    console.print(f"[yellow]warning:[/yellow] {msg}", soft_wrap=True)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c not in (columns[0],) else "left")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    console.print(t)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


class _Plain:
    """Periodic plain log lines: at most one per `every` updates or `seconds` seconds, plus the last."""

    def __init__(self, desc: str, total: int, start: int, every: int, seconds: float = 30.0):
        self.desc, self.total, self.n, self.every, self.seconds = desc, total, start, every, seconds
        self.t0, self.n0, self.last = time.time(), start, 0.0

    def update(self, n: int = 1, resumed: bool = False, **fields) -> None:
        self.n += n
        if resumed:                 # done by an earlier run (replayed from disk): not part of this run's rate
            self.n0 += n
        now = time.time()
        if self.n % self.every == 0 or self.n >= self.total or now - self.last > self.seconds:
            self.last = now
            rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
            extra = " ".join(f"{k}={fmt(v)}" for k, v in fields.items())
            print(f"{self.desc}: {self.n}/{self.total} {extra} {rate:.2f}/s", file=sys.stderr, flush=True)


class _Rich:
    def __init__(self, progress, task, start: int = 0):
        self.progress, self.task, self.done, self.fresh = progress, task, start, 0

    def update(self, n: int = 1, resumed: bool = False, **fields) -> None:
        info = " ".join(f"{k} {fmt(v)}" for k, v in fields.items())
        self.done += n
        if resumed and not self.fresh:  # work replayed before any of this run's: the clock starts after it (replayed
            self.progress.reset(self.task, completed=self.done, info=info)     # later on, it counts in rich's rate)
            self.progress.update(self.task, advance=0)  # all of it replayed: the bar shows finished
            return
        self.fresh += not resumed
        self.progress.update(self.task, advance=n, info=info)


@contextmanager
def progress(desc: str, total: int, start: int = 0, unit: str = "it", every: int = 10) -> Iterator[Any]:
    """A progress reporter with `.update(n=1, resumed=False, **fields)`; `resumed`: units an earlier run did (replayed
    from disk), shown as done but not counted in the rate and the ETA."""
    if not is_tty():
        yield _Plain(desc, total, start, every)
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    class Rate(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return TextColumn(f"{speed:.2f} {unit}/s" if speed else f"- {unit}/s").render(task)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(""),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=False) as p:
        task = p.add_task(desc, total=total, completed=start, info="")
        yield _Rich(p, task, start)
