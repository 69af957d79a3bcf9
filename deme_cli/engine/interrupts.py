"""Stopping cleanly on SIGTERM, SIGINT and SIGUSR1 (preemption, Ctrl-C, SLURM's `--signal` before the time limit).

The CLI installs `handle_signals()` around every command. Outside a long loop a signal ends the command at once
with `Interrupted` (one line, exit code 128 + the signal's number: 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1).
A loop that can stop at a safe point (a training step, a batch of images, a scored merge) opens `deferred()`: inside
it a signal only sets the flag, the loop reads `flag.signum` at its next boundary, saves what it has and raises
`Interrupted` with a message that says what was kept. A second Ctrl-C inside a deferred region stops at once.

A stop is never lost: a signal that arrives after the loop's last check (during its last step, its final checkpoint,
its last scored merge) still ends the command, with `Interrupted` raised when the region ends, so nothing after it
starts (no next range, no next stage of `deme run`). `Interrupted` is a BaseException, as KeyboardInterrupt is, so
that no `except Exception` on the way (a warning that lets a run finish, a library's retry) turns it into success.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None),
                            getattr(signal, "SIGUSR1", None)) if s is not None)


class Interrupted(BaseException):
    """A command stopped by a signal; the message says what was kept and how to continue (the CLI prints it)."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        super().__init__(message or f"stopped by {signal_name(signum)}; re-run the same command to continue where it "
                                    f"stopped")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class StopFlag:
    """Set by a signal inside `deferred()`; the loop checks `signum` at its next safe point."""
    signum: Optional[int] = None
    sigints: int = 0            # Ctrl-C presses so far: the second one does not wait

    @property
    def name(self) -> str:
        return signal_name(self.signum) if self.signum else ""


_deferred: list[StopFlag] = []


def _handler(signum, frame) -> None:
    if _deferred:
        flag = _deferred[-1]
        flag.sigints += signum == signal.SIGINT
        if flag.sigints > 1:
            raise Interrupted(signum, "interrupted twice; stopped without saving the current step (the last "
                                      "checkpoint is kept); re-run the same command to continue from it")
        flag.signum = flag.signum or signum
        return
    raise Interrupted(signum)


@contextmanager
def handle_signals() -> Iterator[None]:
    """Install the handler for SIGNALS (main thread only; elsewhere a no-op) and restore the previous ones after."""
    try:
        previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    except ValueError:          # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def deferred() -> Iterator[StopFlag]:
    """Inside: a signal sets the returned flag instead of interrupting (when `handle_signals` is installed). A flag
    still set when the region ends (the loop ended before it looked again) raises Interrupted there: the work of the
    region is done and saved, and nothing after it starts."""
    flag = StopFlag()
    _deferred.append(flag)
    try:
        yield flag
    finally:
        _deferred.remove(flag)
    if flag.signum:             # reached only when the region ended without an exception
        raise Interrupted(flag.signum, f"stopped by {flag.name} after the work in progress was saved; re-run the "
                                       f"same command to continue where it stopped")
