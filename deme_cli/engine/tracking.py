"""Experiment trackers: each range's metrics lines and preview grids sent to TensorBoard, W&B, ... (train.log_with).

accelerate's trackers do the work: the range's Accelerator is built with `log_with` and `project_dir =
<run>/ranges/<i>/logs` (trainer.make_accelerator), `started(...)` opens the tracker's run (project: the recipe name,
run: `range-<i>`), `log_line` sends a metrics line's scalars at its step and `log_image` a preview grid. Only the main
process logs. TensorBoard writes to `<run>/ranges/<i>/logs/<recipe name>/`; a resumed range appends to the same
folder and tells TensorBoard to drop the steps past the checkpoint it resumed from (SummaryWriter's `purge_step`), so
no step is shown twice. Other trackers start a new run of the same name on resume.

The default, "none", builds no tracker: nothing is imported and nothing goes over the network.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

from .errors import UsageError

# train.log_with -> the pip package accelerate's tracker of that name needs (None: no tracker)
TRACKERS: dict[str, Optional[str]] = {
    "none": None,
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}
LOGS_DIR = "logs"                 # under ranges/<i>/: the tracker's project_dir
SCALARS = ("loss", "denoise_loss", "consistency_loss", "grad_norm", "lr", "t_in_range_fraction")  # of a metrics line
PREVIEW_TAG = "preview"


def check_tracker(log_with: str) -> None:
    """A UsageError when accelerate has no tracker `log_with` or its package is not installed (before training)."""
    if TRACKERS.get(log_with, "") is None:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    if log_with not in LOGGER_TYPE_TO_CLASS:
        raise UsageError(f"train.log_with = \"{log_with}\" is not a tracker of the installed accelerate; upgrade "
                         f"accelerate or set train.log_with to one of: none, {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
    if log_with not in {str(t) for t in get_available_trackers()}:
        package = TRACKERS.get(log_with) or log_with
        raise UsageError(f"train.log_with = \"{log_with}\" needs the Python package {package}, which is not "
                         f"installed; run 'pip install {package}' or set train.log_with = \"none\"")


def accelerator_kwargs(log_with: str, logs_dir) -> dict:
    """Accelerator(...) keywords for train.log_with, logging to `logs_dir` (None or "none": no tracker)."""
    if TRACKERS.get(log_with, "") is None or logs_dir is None:
        return {}
    return {"log_with": log_with, "project_dir": str(logs_dir)}


def _config(inputs: dict) -> dict:
    """Recipe values as tracker hyper-parameters: numbers, strings and booleans as they are, the rest as text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in inputs.items() if v is not None}


@contextmanager
def started(acc, project: str, run_name: str, config: dict, resume_step: int):
    """The accelerator's trackers running for one range (none when it was built without), closed afterwards however
    the range ends. `resume_step`: the step training continues from; TensorBoard drops logged steps past it."""
    if not acc.log_with:
        yield
        return
    init = {"tensorboard": {"purge_step": resume_step + 1} if resume_step else {},
            "wandb": {"name": run_name}, "mlflow": {"run_name": run_name}}
    acc.init_trackers(project, config=_config(config), init_kwargs=init)
    try:
        yield
    finally:
        # not acc.end_training(): it also ends the process group, which the next range of `--all` still needs
        for tracker in acc.trackers:
            tracker.finish()
        acc.trackers = []


def log_line(acc, line: dict) -> None:
    """A metrics line's finite scalars (SCALARS) at its step."""
    if not acc.trackers:
        return
    values = {k: float(line[k]) for k in SCALARS if line.get(k) is not None and math.isfinite(line[k])}
    acc.log(values, step=int(line["step"]))


def log_image(acc, image, step: int, tag: str = PREVIEW_TAG) -> None:
    """One uint8 image (H, W, C) at `step`, to every tracker that takes images."""
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, image, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [image]}, step=step)
