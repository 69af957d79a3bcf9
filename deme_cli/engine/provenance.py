"""What a finished output was made from, and the refusal to reuse it when the recipe says otherwise.

A range's `final/deme.json` and `merged/merge.json` record the recipe values that shape them (`inputs(...)`:
flattened, dotted keys such as `train.lr`); `deme run` records the same per stage in `run.json`. Re-running a command
on finished work whose recorded values differ from the recipe's is refused (`refuse_changed`): one sentence naming
the keys that differ and the way out (`--force`, or another `--out`), instead of skipping the work silently or
replacing it. Keys that change only how fast the work runs (SPEED_ONLY) are never recorded or compared. A key an
old record lacks was not recorded then: it cannot differ.
"""
from __future__ import annotations

from typing import Any, Optional

from .errors import UsageError

# recipe keys that change how fast (or how often and where it is logged, checkpointed and previewed) a stage runs,
# not what it produces
SPEED_ONLY = {
    "data": ("num_workers",),
    "train": ("checkpoint_every", "keep_checkpoints", "log_every", "compile", "gradient_checkpointing", "log_with",
              "preview_every", "preview_images", "preview_steps"),
}


def flatten(d: Any, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def inputs(drop: tuple = (), **sections) -> dict:
    """The recorded values of recipe sections (pydantic sections or plain top-level values like `seed`), flattened,
    without SPEED_ONLY keys and without the dotted keys in `drop`."""
    full = {name: _dump(v) for name, v in sections.items()}
    for section, keys in SPEED_ONLY.items():
        if isinstance(full.get(section), dict):
            full[section] = {k: v for k, v in full[section].items() if k not in keys}
    return {k: v for k, v in flatten(full).items() if k not in drop}


def differences(old: dict, new: dict, defaults: Optional[dict] = None) -> list[str]:
    """`key: old -> new` for every recorded key whose value changed. A key the old record lacks was not recorded
    then: it cannot differ. An old None stands for `defaults[key]` when given (versions that wrote None for
    defaults)."""
    defaults = defaults or {}
    out = []
    for k in sorted(old):
        was = defaults.get(k, old[k]) if old[k] is None else old[k]
        if k in new and was != new[k]:
            out.append(f"{k}: {old[k]!r} -> {new[k]!r}")
    return out


def changed_message(what: str, diff: list[str]) -> str:
    """One sentence: `what` was made from other recipe values (the first two), and the way out."""
    more = f" (and {len(diff) - 2} more)" if len(diff) > 2 else ""
    return (f"{what} was made with a different recipe ({'; '.join(diff[:2])}{more}); re-run with --force to redo it, "
            f"or use another --out")


def refuse_changed(what: str, old: Optional[dict], new: dict, defaults: Optional[dict] = None) -> None:
    """UsageError when the recorded values `old` (None: nothing recorded) differ from `new`."""
    diff = differences(old or {}, new, defaults)
    if diff:
        raise UsageError(changed_message(what, diff))
