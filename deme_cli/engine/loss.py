"""The training loss of a range model (Eq. 5) and one optimizer step.

    L_i = ||target - f_theta_i(x_t, t)||^2 + lambda * ||f_theta(x_t, t) - f_theta_i(x_t, t)||^2        (Eq. 5)

where f_theta is the frozen pretrained teacher on the same x_t and t, and the target follows the scheduler's
prediction type (epsilon, v or x0: `TARGETS`).

train.loss_weighting may weight the denoising term (the first one) per sample by its timestep's signal-to-noise ratio
SNR(t) = abar_t / (1 - abar_t); the consistency term is never weighted, so a weighting raises the consistency term's
relative weight to lambda / w(t) (about 1.4 lambda in the lowest of four uniform ranges with Min-SNR-5, 2.9 lambda
with P2: README, "Loss weighting baselines"). A weighting is defined by its weight w_eps on
the epsilon-space error (`LOSS_WEIGHTINGS`) and converted to the prediction type trained (`EPS_PER_TARGET_LOSS`).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Optional

TARGETS = {  # scheduler prediction_type -> what the UNet should predict
    "epsilon": lambda sched, x0, noise, t: noise,
    "v_prediction": lambda sched, x0, noise, t: sched.get_velocity(x0, noise, t),
    "sample": lambda sched, x0, noise, t: x0,
}


# --- loss weightings of the denoising term -----------------------------------------------------------------------

def min_snr(snr, *, snr_gamma: float, **_):
    """Min-SNR-gamma (Hang et al. 2023, https://arxiv.org/abs/2303.09556; diffusers' --snr_gamma):
    w_eps = min(SNR, gamma) / SNR, written min(1, gamma / SNR) so that SNR = 0 (zero terminal SNR) gives 1."""
    return (snr_gamma / snr).clamp(max=1.0)


def p2(snr, *, p2_gamma: float, p2_k: float, **_):
    """P2 weighting (Choi et al. 2022, https://arxiv.org/abs/2204.00227): w_eps = 1 / (k + SNR)^gamma."""
    return (p2_k + snr) ** -p2_gamma


LOSS_WEIGHTINGS = {  # train.loss_weighting -> w_eps(SNR, settings), the weight of a sample's epsilon-space MSE
    "none": None,    # the plain MSE over every element
    "min_snr": min_snr,
    "p2": p2,
}

EPS_PER_TARGET_LOSS = {  # prediction_type -> (epsilon-space MSE) / (this target's MSE) at the same x_t, from SNR
    "epsilon": lambda snr: 1.0,
    "v_prediction": lambda snr: snr / (snr + 1),    # v = eps / sqrt(abar) - x_t sqrt(1 - abar) / sqrt(abar)
    "sample": lambda snr: snr,                      # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
}


@dataclass(frozen=True)
class LossWeighting:
    """The recipe's weighting of the denoising term: train.loss_weighting and its settings."""
    name: str               # a key of LOSS_WEIGHTINGS
    snr_gamma: float        # min_snr: the SNR cap gamma
    p2_gamma: float         # p2: the exponent gamma
    p2_k: float             # p2: the offset k

    @classmethod
    def from_section(cls, train) -> "LossWeighting":
        """The weighting of the recipe's [train] section."""
        return cls(train.loss_weighting, train.snr_gamma, train.p2_gamma, train.p2_k)


def snr(noise_scheduler, t):
    """SNR(t) = abar_t / (1 - abar_t) of each timestep in t (float32, on t's device); inf where abar_t = 1."""
    abar = noise_scheduler.alphas_cumprod.to(t.device)[t].float()
    return abar / (1 - abar)


def loss_weights(noise_scheduler, t, weighting: str, snr_gamma: float, p2_gamma: float, p2_k: float):
    """Per-sample weights (shape of t) on the MSE of the target the scheduler's prediction_type trains: w_eps of the
    weighting times EPS_PER_TARGET_LOSS (so min_snr with v-prediction is min(SNR, gamma) / (SNR + 1), as diffusers').
    None for "none"."""
    w_eps = LOSS_WEIGHTINGS[weighting]
    if w_eps is None:
        return None
    s = snr(noise_scheduler, t)
    return w_eps(s, snr_gamma=snr_gamma, p2_gamma=p2_gamma, p2_k=p2_k) * \
        EPS_PER_TARGET_LOSS[noise_scheduler.config.prediction_type](s)


# --- the loss and the step ---------------------------------------------------------------------------------------

def noisy_and_target(noise_scheduler, x0, noise, t):
    """(x_t, what the UNet should predict for it) under the scheduler's prediction_type."""
    x_t = noise_scheduler.add_noise(x0, noise, t)
    return x_t, TARGETS[noise_scheduler.config.prediction_type](noise_scheduler, x0, noise, t)


def deme_loss(student, teacher, noise_scheduler, x0, noise, t, unet_kwargs: dict, consistency_weight: float,
              autocast=nullcontext, weighting: Optional[LossWeighting] = None):
    """Eq. 5 on one micro-batch: (loss, denoising loss, consistency loss or None), mean squared errors per element.

    The teacher (the frozen pretrained UNet, or None to skip it) sees the same x_t and t as the student; it runs
    under inference mode, and its output is a constant target. With a `weighting` (None or "none": the plain MSE),
    the loss's denoising term is the batch mean of w(t_b) times sample b's MSE (`loss_weights`), while the returned
    denoising loss stays the unweighted MSE, comparable across weightings; the consistency term is not weighted.
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
    w = None if weighting is None else loss_weights(noise_scheduler, t, weighting.name, weighting.snr_gamma,
                                                    weighting.p2_gamma, weighting.p2_k)
    if w is None:
        denoise = objective = F.mse_loss(pred, target.float())
    else:
        per_sample = (pred - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
        denoise, objective = per_sample.mean(), (w * per_sample).mean()
    if teacher is None:
        return objective, denoise.detach(), None
    # the subtraction saves nothing for backward, so the inference-mode tensor may enter the graph here
    consistency = (pred - pred_teacher.float()).pow(2).mean()
    return objective + consistency_weight * consistency, denoise.detach(), consistency.detach()


def optimizer_step(acc, student, teacher, optimizer, params: list, noise_scheduler, micro_batches: Iterable,
                   n_micro: int, consistency_weight: float, max_grad_norm: float,
                   weighting: Optional[LossWeighting] = None) -> dict:
    """Accumulate the gradients of `n_micro` micro-batches (x0, unet_kwargs, t, noise), clip, and step AdamW.

    Returns device tensors: loss (the objective: the denoising term weighted by `weighting`, plus consistency_weight
    times the consistency loss), denoise_loss (the unweighted MSE), consistency_loss (None without teacher),
    grad_norm (before clipping).
    """
    total = {"loss": 0.0, "denoise_loss": 0.0, "consistency_loss": None if teacher is None else 0.0}
    for j, (x0, kwargs, t, noise) in enumerate(micro_batches):
        sync = j == n_micro - 1 or acc.num_processes == 1
        with nullcontext() if sync else acc.no_sync(student):
            loss, denoise, consistency = deme_loss(student, teacher, noise_scheduler, x0, noise, t, kwargs,
                                                   consistency_weight, acc.autocast, weighting)
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
