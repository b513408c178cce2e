"""The DreamBooth objective as pure tensor functions (Ruiz et al., CVPR 2023, Sec. 3.3, Eq. 2)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers.training_utils import compute_snr


class DreamBoothLoss(NamedTuple):
    """The total loss and its two terms (the prior term is zero when no class examples are in the batch)."""

    loss: torch.Tensor
    instance_loss: torch.Tensor
    prior_loss: torch.Tensor


def dreambooth_loss(
    model_pred: torch.Tensor | list[torch.Tensor],
    target: torch.Tensor | list[torch.Tensor],
    is_prior: torch.Tensor,
    prior_loss_weight: float = 1.0,
    weights: torch.Tensor | None = None,
) -> DreamBoothLoss:
    """Instance loss plus `prior_loss_weight` times the class-specific prior-preservation loss.

    L = mean_{i: subject} w_i ||pred_i - target_i||^2 + lambda * mean_{j: class} w_j ||pred_j - target_j||^2,
    where ||.||^2 is the mean squared error over an example's elements and w the per-example weights (1 if None).

    Args:
        model_pred (`torch.Tensor` or `list[torch.Tensor]`): the denoiser's output, batch first; or its outputs for
            consecutive groups of examples of different shapes (aspect-ratio buckets), one tensor per group.
        target (`torch.Tensor` or `list[torch.Tensor]`): what it should have predicted (noise, velocity, ...), same
            shape(s).
        is_prior (`torch.Tensor`): boolean `(batch,)` mask, True for class (prior-preservation) examples.
        prior_loss_weight (`float`, *optional*, defaults to `1.0`): lambda; the paper uses 1.
        weights (`torch.Tensor`, *optional*): per-example weights `(batch,)`, e.g. min-SNR weights.
    """
    if isinstance(model_pred, torch.Tensor):
        model_pred, target = [model_pred], [target]
    per_example = torch.cat(
        [(pred.float() - goal.float()).pow(2).flatten(1).mean(dim=1) for pred, goal in zip(model_pred, target)]
    )
    if weights is not None:
        per_example = per_example * weights.to(per_example)
    is_prior = is_prior.to(per_example.device, torch.bool)
    instance_loss = _masked_mean(per_example, ~is_prior)
    prior_loss = _masked_mean(per_example, is_prior)
    return DreamBoothLoss(instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is True; zero (keeping the graph) where it selects nothing."""
    count = mask.sum()
    return (values * mask).sum() / count.clamp(min=1)


def snr_loss_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al., 2023, Eq. 9): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr
