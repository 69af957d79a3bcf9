"""One measurement in a fresh spawned process (so its peak memory is its own); a failure is reported, not raised."""
from __future__ import annotations


def _target(q, fn, args) -> None:
    try:
        q.put(fn(*args))
    except Exception as e:  # reported in the table, not raised: the other measurements may still run
        q.put({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


def in_child(fn, *args) -> dict:
    """fn(*args) in a spawned process (fn a module-level function), or {"error": ...}."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_target, args=(q, fn, args))
    p.start()
    p.join()
    return q.get() if not q.empty() else {"error": f"process died (exit {p.exitcode}; out of memory?)"}
