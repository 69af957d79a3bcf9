"""The training loss of a range model (Eq. 5) and one optimizer step.

    L_i = ||target - f_theta_i(x_t, t)||^2 + lambda * ||f_theta(x_t, t) - f_theta_i(x_t, t)||^2        (Eq. 5)

where f_theta is the frozen pretrained teacher on the same x_t and t, and the target follows the scheduler's
prediction type (epsilon, v or x0: `TARGETS`).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Iterable

TARGETS = {  # scheduler prediction_type -> what the UNet should predict
    "epsilon": lambda sched, x0, noise, t: noise,
    "v_prediction": lambda sched, x0, noise, t: sched.get_velocity(x0, noise, t),
    "sample": lambda sched, x0, noise, t: x0,
}


def noisy_and_target(noise_scheduler, x0, noise, t):
    """(x_t, what the UNet should predict for it) under the scheduler's prediction_type."""
    x_t = noise_scheduler.add_noise(x0, noise, t)
    return x_t, TARGETS[noise_scheduler.config.prediction_type](noise_scheduler, x0, noise, t)


def deme_loss(student, teacher, noise_scheduler, x0, noise, t, unet_kwargs: dict, consistency_weight: float,
              autocast=nullcontext):
    """Eq. 5 on one micro-batch: (loss, denoising loss, consistency loss or None), mean squared errors per element.

    The teacher (the frozen pretrained UNet, or None to skip it) sees the same x_t and t as the student; it runs
    under inference mode, and its output is a constant target.
    """
    import torch
    import torch.nn.functional as F

    x_t, target = noisy_and_target(noise_scheduler, x0, noise, t)
    with autocast():
        pred = student(x_t, t, **unet_kwargs).sample
        if teacher is not None:
            with torch.inference_mode():
                pred_teacher = teacher(x_t, t, **unet_kwargs).sample
    pred = pred.float()
    denoise = F.mse_loss(pred, target.float())
    if teacher is None:
        return denoise, denoise.detach(), None
    # the subtraction saves nothing for backward, so the inference-mode tensor may enter the graph here
    consistency = (pred - pred_teacher.float()).pow(2).mean()
    return denoise + consistency_weight * consistency, denoise.detach(), consistency.detach()


def optimizer_step(acc, student, teacher, optimizer, params: list, noise_scheduler, micro_batches: Iterable,
                   n_micro: int, consistency_weight: float, max_grad_norm: float) -> dict:
    """Accumulate the gradients of `n_micro` micro-batches (x0, unet_kwargs, t, noise), clip, and step AdamW.

    Returns device tensors: loss, denoise_loss, consistency_loss (None without teacher), grad_norm (before clipping).
    """
    total = {"loss": 0.0, "denoise_loss": 0.0, "consistency_loss": None if teacher is None else 0.0}
    for j, (x0, kwargs, t, noise) in enumerate(micro_batches):
        sync = j == n_micro - 1 or acc.num_processes == 1
        with nullcontext() if sync else acc.no_sync(student):
            loss, denoise, consistency = deme_loss(student, teacher, noise_scheduler, x0, noise, t, kwargs,
                                                   consistency_weight, acc.autocast)
            acc.backward(loss / n_micro)
        total["loss"] += loss.detach() / n_micro
        total["denoise_loss"] += denoise / n_micro
        if consistency is not None:
            total["consistency_loss"] += consistency / n_micro
    # max_norm = inf measures the norm without changing the gradients (clip coefficient clamps to 1)
    total["grad_norm"] = acc.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total
