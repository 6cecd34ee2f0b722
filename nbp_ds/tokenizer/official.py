"""The NBP authors' released video tokenizers (``magvit2_ucf.pt``, ``magvit2_k600.pt``): a port, key for key.

A causal 3D CNN (MAGVIT-v2 style) with FSQ levels [8,8,8,5,5,5] (64,000 codes): RGB in [0, 1], 17 frames
at 128x128 -> 5x16x16 latents of 6 channels. Its pieces differ from nbp_ds' own tokenizer (learned-beta
Swish, replicate padding in space too, twice the temporal padding, depth-to-space upsampling, inputs in
[0, 1]), so it is its own module with the same interface as ``VideoTokenizer``: ``encode`` (uint8 video ->
code indices), ``decode``, ``latent_shape``, ``check_clip_shape``, ``codebook_size``, ``name``, ``version``.

Module names follow the released files (``encoder_layers.*``, ``decoder_layers.*``; residual units hold
``fn`` and ``residual_fn``, causal convolutions ``conv``) so their state dicts load key for key. The code
index is nbp_ds.tokenizer.fsq.FSQ's: sum_d (code_d * half_d + half_d) * basis_d, channel 0 least
significant, half = [4,4,4,2,2,2], basis = [1,8,64,512,2560,12800].

Its quantizer is ``ReleasedFSQ``: the FSQ paper's reference bounding (``(1 - eps)`` and ``tan``), not nbp_ds'
own FSQ bounding (``(1 + eps)`` and ``atanh``, the later form of the public FSQ ports). With nbp_ds' bounding
9 of 1,280 codes differed from the authors' tokenizer's on seeded weights (99.3%); the two bounding forms
round about one code in a hundred differently. The authors' ``nbp/quantizers/fsq.py`` was not available to
compare line by line, so the reference form is the one their code most likely keeps, not a verified copy.

``width`` scales every channel count (128 in the released files) so tests can build the same structure
smaller; GroupNorm always has 32 groups, so the width must be a multiple of 32.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nbp_ds.errors import CheckpointError
from nbp_ds.files import write_text_atomic
from nbp_ds.official.files import read_torch_file, require_matching_state
from nbp_ds.tokenizer.base import VideoTokenizerBase, run_layers
from nbp_ds.tokenizer.fsq import FSQ

log = logging.getLogger(__name__)

LEVELS = [8, 8, 8, 5, 5, 5]
GROUPS = 32
RELEASED_WIDTH = 128
SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4


class ReleasedFSQ(FSQ):
    """FSQ with the bounding of the FSQ paper's reference code (Mentzer et al. 2023, appendix), as the released
    tokenizers compute it in float32: ``half_l = (L - 1) * (1 - eps) / 2``, ``offset = 0.5`` for even L,
    ``shift = tan(offset / half_l)``, ``tanh(z + shift) * half_l - offset``. Rounding, values and code
    indices are FSQ's."""

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        half_l = (self._levels - 1) * (1 - self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.tan(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset


class Swish(nn.Module):
    """x * sigmoid(beta * x) with a learned beta per channel (initialized to 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm(32) over each frame on its own: statistics across time would leak the future into the past."""

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class CausalConv3d(nn.Module):
    """A 3D convolution padded in replicate mode: k//2 on both sides in space, 2 * (k_t // 2) before the first
    frame in time and none after, so no output frame sees a later input frame."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.padding = (kernel // 2,) * 4 + (2 * (kernel // 2), 0)  # (w, w, h, h, t_front, t_back)
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            x = F.pad(x, self.padding, mode="replicate")
        return self.conv(x)


class ResidualUnit(nn.Module):
    """[GroupNorm, Swish, conv, GroupNorm, Swish, conv] plus a skip that is a 1x1x1 conv when widths differ."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.fn = nn.Sequential(FrameGroupNorm(c_in), Swish(c_in), CausalConv3d(c_in, c_out),
                                FrameGroupNorm(c_out), Swish(c_out), CausalConv3d(c_out, c_out))
        self.residual_fn = nn.Sequential(CausalConv3d(c_in, c_out, kernel=1)) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + self.residual_fn(x)


class DepthToSpace3d(nn.Module):
    """[B, C * bt * bh * bw, T, H, W] -> [B, C, T * bt, H * bh, W * bw]; input channel
    ((tb * bh + hb) * bw + wb) * C + c lands at offset (tb, hb, wb). A temporal expansion then drops its first
    bt - 1 frames, so the first latent frame still becomes one video frame (1 + k -> 1 + bt * k)."""

    def __init__(self, block: tuple[int, int, int]):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, channels, t, h, w = x.shape
        bt, bh, bw = self.block
        c = channels // (bt * bh * bw)
        y = x.reshape(b, bt, bh, bw, c, t, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
        y = y.reshape(b, c, t * bt, h * bh, w * bw)
        return y[:, :, bt - 1:] if bt > 1 else y


def units(c_in: int, c_out: int, count: int) -> list[nn.Module]:
    """``count`` residual units, the first one changing the width from c_in to c_out."""
    return [ResidualUnit(c_in if i == 0 else c_out, c_out) for i in range(count)]


def encoder_layers(width: int, latent_dim: int) -> nn.ModuleList:
    c1, c2, c4 = width, 2 * width, 4 * width
    return nn.ModuleList([
        CausalConv3d(3, c1),
        *units(c1, c1, 4),
        CausalConv3d(c1, c1, stride=(1, 2, 2)),
        *units(c1, c2, 4),
        CausalConv3d(c2, c2, stride=(2, 2, 2)),
        *units(c2, c2, 4),
        CausalConv3d(c2, c2, stride=(2, 2, 2)),
        *units(c2, c4, 8),
        FrameGroupNorm(c4), Swish(c4), nn.Conv3d(c4, latent_dim, 1),
    ])


def decoder_layers(width: int, latent_dim: int) -> nn.ModuleList:
    c1, c2, c4 = width, 2 * width, 4 * width
    return nn.ModuleList([
        CausalConv3d(latent_dim, c4),
        *units(c4, c4, 8),
        CausalConv3d(c4, 8 * c4), DepthToSpace3d((2, 2, 2)),
        *units(c4, c2, 4),
        CausalConv3d(c2, 8 * c2), DepthToSpace3d((2, 2, 2)),
        *units(c2, c2, 4),
        CausalConv3d(c2, 4 * c2), DepthToSpace3d((1, 2, 2)),
        *units(c2, c1, 4),
        FrameGroupNorm(c1), Swish(c1), CausalConv3d(c1, 3),
    ])


class OfficialTokenizer(VideoTokenizerBase):
    """Video <-> FSQ codes with the released architecture. ``encode(uint8 [B,N,H,W,3]) -> long [B,T',H',W']``."""

    def __init__(self, width: int = RELEASED_WIDTH, name: str = "official", version: str = "untrained"):
        super().__init__()
        if width <= 0 or width % GROUPS:
            raise ValueError(f"official tokenizer width must be a positive multiple of {GROUPS}, got {width}")
        self.width, self._name, self._version = width, name, version
        self.temporal_factor, self.spatial_factor = TEMPORAL_FACTOR, SPATIAL_FACTOR
        self.fsq = ReleasedFSQ(LEVELS)
        self.encoder_layers = encoder_layers(width, self.fsq.dim)
        self.decoder_layers = decoder_layers(width, self.fsq.dim)

    # ---- identity ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    # ---- float paths ------------------------------------------------------------------------------
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """RGB float [B, 3, N, H, W] in [0, 1] -> latents before quantization [B, 6, T', H', W']."""
        return run_layers(self.encoder_layers, x, self.activation_checkpointing)

    def decode_values(self, values: torch.Tensor) -> torch.Tensor:
        """Quantized values [B, 6, T', H', W'] in [-1, 1] -> RGB float [B, 3, N, H, W] (not clamped)."""
        return run_layers(self.decoder_layers, values, self.activation_checkpointing)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training path (fine-tuning with nbp-train-tokenizer): x float [B,3,N,H,W] in [-1, 1], the trainer's
        range -> (reconstruction in [-1, 1] (not clamped), code indices [B,T',H',W']); [0, 1] inside, as released."""
        # quantized in float32 under bf16 autocast (rounding in bf16 would move codes)
        values, indices = self.fsq(self.encode_latents((x + 1) / 2).float().permute(0, 2, 3, 4, 1))
        return self.decode_values(values.permute(0, 4, 1, 2, 3).to(x.dtype)) * 2 - 1, indices

    @property
    def output_weight(self) -> torch.Tensor:
        """The decoder's last convolution's weight (where the adaptive GAN weight compares gradients)."""
        return self.decoder_layers[-1].conv.weight

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/tokenizer.safetensors`` and ``folder/config.json`` (architecture ``official``): a folder
        ``load_tokenizer`` takes like any trained tokenizer's; the version becomes the hash of the weights."""
        folder = Path(folder)
        save_official_tokenizer(self, folder / "tokenizer.safetensors")
        self._version = state_digest(self.state_dict())
        write_text_atomic(folder / "config.json", json.dumps({"architecture": "official", "width": self.width,
                                                              "name": self.name, "version": self.version}) + "\n")
        return folder

    # ---- uint8 paths (tokenizing, sampling): RGB in [0, 1], as released ----------------------------
    def video_to_latents(self, video: torch.Tensor) -> torch.Tensor:
        return self.encode_latents(video.permute(0, 4, 1, 2, 3).float() / 255.0)

    def decode_values_float(self, values: torch.Tensor) -> torch.Tensor:
        return self.decode_values(values)

    def latents_to_video(self, values: torch.Tensor) -> torch.Tensor:
        video = self.decode_values(values).clamp(0.0, 1.0)  # the released decoder's output is clamped to [0, 1]
        return (video * 255.0).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


# ---- files ----------------------------------------------------------------------------------------
def read_official_tokenizer_state(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a released ``.pt`` (``{"model_state_dict": {"module.…": tensor}}``) or of a
    ``.safetensors`` copy (nbp-convert-official tokenizer), with the ``module.`` prefix removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return load_file(str(path))
    package = read_torch_file(path, trust_pickle=trust_pickle,
                              how_to_trust=f"convert it once with `nbp-convert-official tokenizer {path} "
                                           f"OUT.safetensors --trust-pickle` and load official:OUT.safetensors")
    state = package.get("model_state_dict") if isinstance(package, dict) else None
    if not isinstance(state, dict):
        found = sorted(package)[:8] if isinstance(package, dict) else type(package).__name__
        raise CheckpointError(f"{path}: not an NBP tokenizer file (expected a dict with 'model_state_dict', "
                              f"found {found})")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_official_tokenizer(path: str | Path, device: str | torch.device = "cpu", trust_pickle: bool = False,
                            name: str | None = None) -> OfficialTokenizer:
    """A released tokenizer file -> OfficialTokenizer in eval mode. Keys and shapes must match exactly;
    the width is read from the first convolution; the version is a hash of the weights."""
    path = Path(path)
    state = read_official_tokenizer_state(path, trust_pickle)
    first = state.get("encoder_layers.0.conv.weight")
    width = int(first.shape[0]) if first is not None and first.ndim == 5 else RELEASED_WIDTH
    if width % GROUPS:
        raise CheckpointError(f"{path}: encoder_layers.0.conv.weight has {width} output channels, not a multiple "
                              f"of {GROUPS}: not an NBP tokenizer")
    tokenizer = OfficialTokenizer(width, name=name or f"official-{path.stem}", version=state_digest(state))
    expected = {k: v.shape for k, v in tokenizer.state_dict().items()}
    require_matching_state(expected, state, f"{path} does not fit the NBP tokenizer (width {width})")
    tokenizer.load_state_dict({k: v.float() for k, v in state.items()})
    if width != RELEASED_WIDTH:
        log.warning("%s: width %d, not the released %d", path, width, RELEASED_WIDTH)
    return tokenizer.to(device).eval()


def save_official_tokenizer(tokenizer: OfficialTokenizer, out: str | Path) -> Path:
    """Write the weights as .safetensors (readable without pickle); load it back with ``official:OUT``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"nbp_ds_official_tokenizer": tokenizer.name})
    tmp.replace(out)
    return out


def state_digest(state: dict[str, torch.Tensor], length: int = 12) -> str:
    """First ``length`` hex digits of a SHA-256 over the keys and fp32 values (the tokenizer version written
    into shards): the same for a released .pt and its .safetensors copy."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:length]
