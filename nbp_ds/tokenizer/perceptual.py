"""The perceptual loss of the tokenizer recipe: LPIPS's distance over VGG16 features, from a weights file the user
supplies (nbp_ds never downloads one).

The network is VGG16's convolutional part with torchvision's module layout, so its ``vgg16-397923af.pth`` (or any
state dict whose ``features.*`` keys have those shapes, .pth or .safetensors) loads key for key. Every frame is
scaled from [-1, 1] to [0, 1], normalized with the ImageNet mean and std, and compared at relu1_2, relu2_2,
relu3_3, relu4_3 and relu5_3: features are divided by their norm over channels and the distance of a layer is the
squared difference summed over channels, averaged over positions; the loss sums the layers and averages the
frames (LPIPS with equal channel weights, Zhang et al. 2018).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from nbp_ds.errors import UsageError

log = logging.getLogger(__name__)

VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's features
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return nn.Sequential(*layers)


def normalized_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS's distance of one layer: features [N, C, H, W] divided by their norm over C, squared difference
    summed over C, averaged over H, W -> [N]."""
    a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
    b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
    return (a - b).pow(2).sum(1).mean((1, 2))


class PerceptualLoss(nn.Module):
    """LPIPS-style distance between two float videos [B, 3, N, H, W] in [-1, 1] (frozen VGG16 features)."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _taps(self, frames: torch.Tensor) -> list[torch.Tensor]:
        x = ((frames + 1) / 2 - self.mean) / self.std
        taps = []
        for i, layer in enumerate(self.features[:TAPS[-1] + 1]):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        frames = [v.transpose(1, 2).reshape(-1, 3, *v.shape[-2:]) for v in (a, b)]
        total = sum(normalized_distance(fa, fb) for fa, fb in zip(*map(self._taps, frames), strict=True))
        return total.mean()


def load_perceptual_loss(path: str | Path | None) -> PerceptualLoss | None:
    """The perceptual loss with VGG16 weights from ``path`` (torchvision's vgg16 .pth or a .safetensors of its
    ``features.*`` tensors); None, with a log line saying so, when no file is given."""
    if path is None:
        log.warning("perceptual loss off: no VGG16 weights file given (loss.perceptual_file; torchvision's "
                    "vgg16-397923af.pth, fetched by you: nbp_ds downloads nothing)")
        return None
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"loss.perceptual_file {path}: no such file (torchvision's vgg16 weights)")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    features = vgg16_features()
    wanted = {f"features.{k}": v.shape for k, v in features.state_dict().items()}
    found = {k: v for k, v in state.items() if k.startswith("features.")}
    bad = sorted(k for k in wanted if k not in found or found[k].shape != wanted[k])
    if bad:
        raise UsageError(f"loss.perceptual_file {path}: not VGG16 weights (missing or misshaped: {', '.join(bad[:4])})")
    features.load_state_dict({k.removeprefix("features."): v.float() for k, v in found.items()})
    log.info("perceptual loss: VGG16 features from %s", path)
    return PerceptualLoss(features)
