"""The tokenizer recipe's loss terms against values computed by hand: the hinge discriminator loss, LeCAM
regularisation with its moving averages, VQGAN's adaptive generator weight, SSIM and the perceptual distance."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from nbp_ds.errors import UsageError
from nbp_ds.tokenizer.perceptual import load_perceptual_loss, normalized_distance, vgg16_features
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


def test_perceptual_distance_by_hand():
    # one position, channels (3, 4) and (4, 3): normalized (0.6, 0.8) and (0.8, 0.6), squared distance 0.08;
    # a second, equal position halves the mean
    a = torch.tensor([[3.0, 4.0], [1.0, 1.0]]).T.reshape(1, 2, 1, 2)
    b = torch.tensor([[4.0, 3.0], [1.0, 1.0]]).T.reshape(1, 2, 1, 2)
    assert normalized_distance(a, b).tolist() == pytest.approx([0.04])


def write_vgg16_file(path):
    """A VGG16 weights file in torchvision's layout (features.* and classifier.*), seeded."""
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(state, path)
    return path


def test_perceptual_loss_loads_a_user_file_and_is_off_without_one(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert load_perceptual_loss(None) is None
    assert "perceptual loss off: no VGG16 weights file given" in caplog.text
    with pytest.raises(UsageError, match="no such file"):
        load_perceptual_loss(tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UsageError, match="not VGG16 weights.*features.0.bias"):
        load_perceptual_loss(tmp_path / "other.pth")

    loss = load_perceptual_loss(write_vgg16_file(tmp_path / "vgg16.pth"))
    x = torch.rand(1, 3, 2, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    assert float(loss(x, x)) == 0.0
    value = loss(y, x)
    value.backward()
    assert float(value) > 0 and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())  # the network stays frozen
