"""The tokenizer recipe's loss terms against values computed by hand: the hinge discriminator loss, LeCAM
regularisation with its moving averages, and VQGAN's adaptive generator weight."""

from __future__ import annotations

import math

import pytest
import torch

from nbp_ds.tokenizer.training import LeCam, adaptive_generator_weight, hinge_d_loss, ssim


def test_hinge_discriminator_loss_by_hand():
    # 0.5 * (mean(relu(1 - [0.5, 2])) + mean(relu(1 + [-0.5, 1]))) = 0.5 * (0.25 + 1.25)
    assert float(hinge_d_loss(torch.tensor([0.5, 2.0]), torch.tensor([-0.5, 1.0]))) == pytest.approx(0.75)


def test_lecam_penalty_and_its_moving_averages_by_hand():
    lecam = LeCam(decay=0.9)
    # first batch: the averages start at its means, a_r = 2, a_f = -1
    # R = mean(relu([1, 3] + 1)^2) + mean(relu(2 - [-2, 0])^2) = mean(4, 16) + mean(16, 4) = 20
    assert float(lecam.penalty(torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0]))) == pytest.approx(20.0)
    assert (lecam.real, lecam.fake) == pytest.approx((2.0, -1.0))
    # second: R = relu(0 + 1)^2 + relu(2 - 1)^2 = 2; then a_r = 0.9*2 + 0.1*0, a_f = 0.9*-1 + 0.1*1
    assert float(lecam.penalty(torch.tensor([0.0]), torch.tensor([1.0]))) == pytest.approx(2.0)
    assert (lecam.real, lecam.fake) == pytest.approx((1.8, -0.8))
    again = LeCam()
    again.load_state_dict(lecam.state_dict())
    assert (again.decay, again.real, again.fake) == (0.9, lecam.real, lecam.fake)
    # only the side past the other's average is penalised
    far = LeCam(decay=0.9)
    far.penalty(torch.tensor([0.0]), torch.tensor([0.0]))
    assert float(far.penalty(torch.tensor([-1.0]), torch.tensor([1.0]))) == 0.0


def test_adaptive_generator_weight_by_hand():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec, gan = (w ** 2).sum(), 3 * w.sum()  # gradients [2, 4] and [3, 3]
    weight = adaptive_generator_weight(rec, gan, w)
    assert float(weight) == pytest.approx(math.sqrt(20) / (math.sqrt(18) + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    flat = adaptive_generator_weight((w ** 2).sum(), 0 * w.sum(), w)  # no GAN gradient: clamped
    assert float(flat) == 1e4


def test_ssim_by_hand():
    a = torch.rand(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert ssim(a, a) == pytest.approx(1.0)
    # two constant frames, 0.5 and 0.25 on the [0, 1] scale: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    c1 = 0.01 ** 2
    flat = ssim(torch.zeros(1, 3, 1, 16, 16), torch.full((1, 3, 1, 16, 16), -0.5))
    assert flat == pytest.approx((2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1), rel=1e-5)
    assert ssim(a, -a) < 0.1 < ssim(a, (a + 0.05 * torch.randn_like(a)).clamp(-1, 1)) < 1
