"""The DreamBooth objective on hand-computed tensors (Ruiz et al. 2023, Eq. 2)."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_dreambooth.losses import dreambooth_loss, snr_loss_weights


def test_prior_loss_matches_the_papers_formula():
    # Two subject examples and two class examples, each a 1x1x2 "latent".
    pred = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]], [[[2.0, 2.0]]], [[[1.0, -1.0]]]])
    target = torch.zeros_like(pred)
    is_prior = torch.tensor([False, False, True, True])
    result = dreambooth_loss(pred, target, is_prior, prior_loss_weight=0.5)
    # Per-example MSE: (1+9)/2=5, 0, (4+4)/2=4, (1+1)/2=1.
    assert result.instance_loss.item() == pytest.approx((5 + 0) / 2)
    assert result.prior_loss.item() == pytest.approx((4 + 1) / 2)
    assert result.loss.item() == pytest.approx(2.5 + 0.5 * 2.5)


def test_weights_apply_per_example_to_both_terms():
    pred = torch.tensor([[2.0], [2.0], [2.0], [2.0]])
    target = torch.zeros_like(pred)
    is_prior = torch.tensor([False, False, True, True])
    weights = torch.tensor([1.0, 0.5, 0.25, 0.0])
    result = dreambooth_loss(pred, target, is_prior, prior_loss_weight=1.0, weights=weights)
    assert result.instance_loss.item() == pytest.approx((4 * 1.0 + 4 * 0.5) / 2)
    assert result.prior_loss.item() == pytest.approx((4 * 0.25 + 0.0) / 2)


def test_without_class_examples_the_loss_is_the_plain_mse():
    pred = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    result = dreambooth_loss(pred, target, torch.zeros(3, dtype=torch.bool), prior_loss_weight=1.0)
    assert result.prior_loss.item() == 0.0
    assert result.loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item(), rel=1e-6)


def test_gradient_flows_through_both_terms():
    pred = torch.ones(2, 1, requires_grad=True)
    result = dreambooth_loss(pred, torch.zeros(2, 1), torch.tensor([False, True]), prior_loss_weight=2.0)
    result.loss.backward()
    # d/dp of p^2 is 2p = 2; the prior example carries the weight 2.
    assert pred.grad.flatten().tolist() == pytest.approx([2.0, 4.0])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weights = snr_loss_weights(scheduler, timesteps, snr_gamma=5.0, prediction_type=prediction_type)
    divisor = snr + 1 if prediction_type == "v_prediction" else snr
    torch.testing.assert_close(weights, torch.clamp(snr, max=5.0) / divisor)
    # Low-noise steps (high SNR) are down-weighted; the noisiest step keeps weight min(snr,5)/snr = 1 (epsilon).
    assert weights[0] < weights[2]
