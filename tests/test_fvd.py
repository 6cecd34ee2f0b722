"""FVD: Fréchet distance against independent references, clip preprocessing, the detector path and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbp_ds import ffmpeg_tools
from nbp_ds.cli import eval_fvd
from nbp_ds.errors import UsageError
from nbp_ds.eval import (
    I3DFeatureExtractor,
    compute_fvd,
    frechet_distance,
    fvd_from_features,
    gaussian_stats,
    preprocess_clips,
)
from nbp_ds.eval import fvd as fvd_mod

# TorchScript is what StyleGAN-V's detector is, so its deprecation in recent PyTorch is not actionable here.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _reference_frechet(mu1, s1, mu2, s2) -> float:
    """Independent of scipy.linalg.sqrtm: tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), both roots via eigh."""

    def sqrt_psd(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = sqrt_psd(s1)
    trace_term = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_term)


# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------------


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    dim = 16
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("dim", [1, 5, 64])
def test_frechet_full_covariance_matches_eigh_reference(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim) + 0.5
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    expected = _reference_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-8)
    # Symmetric in its two arguments.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_frechet_identical_stats_is_zero():
    rng = np.random.default_rng(1)
    mu, s = rng.standard_normal(32), _random_spd(rng, 32)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)


def test_frechet_rejects_non_psd_and_bad_shapes():
    # diag(1, -4) is not a covariance: its square root is diag(1, 2i), a large imaginary part.
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -4.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_frechet_retries_with_eps_offset_when_sqrtm_fails(monkeypatch):
    """A singular product can make sqrtm return non-finite values; the retry adds eps*I to both covariances."""
    real_sqrtm = fvd_mod.linalg.sqrtm
    calls = []

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fvd_mod.linalg, "sqrtm", flaky_sqrtm)
    s1, s2 = np.diag([1.0, 0.0]), np.diag([4.0, 0.0])
    got = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))
    assert got == pytest.approx(1.0, abs=1e-5)  # (sqrt(1) - sqrt(4))^2 + O(eps)


def test_frechet_rank_deficient_covariances_are_handled():
    """Fewer samples than dimensions (common in small FVD runs): identical sets still give ~0."""
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((10, 50))
    mu, s = gaussian_stats(feats)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6 * np.trace(s)


# ---------------------------------------------------------------------------------------------------------------------
# Sample statistics
# ---------------------------------------------------------------------------------------------------------------------


def test_gaussian_stats_converge_to_analytic_distance():
    rng = np.random.default_rng(3)
    dim, n = 4, 200_000
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.3, 0.7, -1.2, 0.0])
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    m1, c1 = gaussian_stats(x1)
    np.testing.assert_allclose(m1, mu1, atol=0.02)
    np.testing.assert_allclose(c1, s1, atol=0.02)
    analytic = _reference_frechet(mu1, s1, mu2, s2)
    assert fvd_from_features(x1, x2) == pytest.approx(analytic, rel=0.03, abs=0.01)


def test_gaussian_stats_validation():
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(np.zeros((1, 8)))
    with pytest.raises(ValueError, match="2-D"):
        gaussian_stats(np.zeros(8))
    bad = np.ones((4, 3))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gaussian_stats(bad)
    mu, sigma = gaussian_stats(np.array([[0.0, 1.0], [2.0, 3.0]]))
    np.testing.assert_allclose(mu, [1.0, 2.0])
    np.testing.assert_allclose(sigma, [[2.0, 2.0], [2.0, 2.0]])  # unbiased (ddof=1)


# ---------------------------------------------------------------------------------------------------------------------
# Clip preprocessing
# ---------------------------------------------------------------------------------------------------------------------


def test_preprocess_clips_shape_range_and_layout():
    rng = np.random.default_rng(4)
    videos = rng.integers(0, 256, size=(2, 20, 32, 48, 3), dtype=np.uint8)
    videos[0, 0] = 0
    videos[0, 1] = 255
    out = preprocess_clips(videos, num_frames=16)
    assert out.shape == (2, 3, 16, 224, 224) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    # Constant frames stay exactly at the ends of the range (bilinear resize of a constant is that constant).
    assert torch.all(out[0, :, 0] == -1.0) and torch.all(out[0, :, 1] == 1.0)
    # Channel c of frame t comes from videos[..., t, :, :, c]: compare with an explicit per-frame resize.
    frame = torch.from_numpy(videos[1, 5]).permute(2, 0, 1)[None].float()
    expected = F.interpolate(frame, size=(224, 224), mode="bilinear", align_corners=False)[0] * (2 / 255) - 1
    torch.testing.assert_close(out[1, :, 5], expected)
    # Tensor input and an already-224 input (no resize) work too.
    same = preprocess_clips(torch.full((1, 16, 224, 224, 3), 51, dtype=torch.uint8))
    torch.testing.assert_close(same, torch.full((1, 3, 16, 224, 224), 51 * 2 / 255 - 1))


def test_preprocess_clips_errors():
    with pytest.raises(ValueError, match="at least 16 frames.*only 10"):
        preprocess_clips(np.zeros((1, 10, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        preprocess_clips(np.zeros((1, 16, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        preprocess_clips(np.zeros((16, 8, 8, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# Detector path, with a tiny TorchScript stand-in for StyleGAN-V's i3d_torchscript.pt
# ---------------------------------------------------------------------------------------------------------------------


class TinyDetector(torch.nn.Module):
    """Same call signature as the real detector; checks that it is called the way the protocol says.

    The real detector returns 400 logits; tests that compute a Fréchet distance use fewer output features because a
    400x400 sqrtm takes seconds on a small CPU, and the distance itself is tested above.
    """

    def __init__(self, out_dim: int = 400) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 2 * 4 * 4, out_dim, generator=gen))

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale or resize or not return_features:
            raise RuntimeError("expected rescale=False, resize=False, return_features=True")
        if x.dim() != 5 or x.shape[1] != 3 or x.shape[3] != 224 or x.shape[4] != 224:
            raise RuntimeError("expected [B, 3, T, 224, 224] input")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0):
            raise RuntimeError("expected values in [-1, 1]")
        pooled = F.adaptive_avg_pool3d(x, [2, 4, 4]).flatten(1)
        return torch.tanh(pooled) @ self.proj


def _save_detector(path: Path, out_dim: int) -> Path:
    torch.jit.script(TinyDetector(out_dim)).save(str(path))
    return path


@pytest.fixture()
def tiny_i3d(tmp_path) -> Path:
    """A small stand-in detector with 32 output features (fast Fréchet distances)."""
    return _save_detector(tmp_path / "tiny_i3d.pt", 32)


def _videos(seed: int, n: int, low: int = 0, high: int = 256, t: int = 17) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=(n, t, 24, 32, 3), dtype=np.uint8)


def test_extractor_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        I3DFeatureExtractor(tmp_path / "nope.pt")
    msg = str(info.value)
    assert "i3d_torchscript.pt" in msg and "--i3d PATH" in msg and "cannot be downloaded" in msg


def test_extractor_features_batching_and_inputs(tmp_path):
    extractor = I3DFeatureExtractor(_save_detector(tmp_path / "i3d400.pt", 400), batch_size=3)
    videos = _videos(0, 7)
    feats = extractor.features(videos)
    assert feats.shape == (7, 400) and feats.dtype == np.float64
    # Batch size and input form (one array, list of clips, generator) do not change the features.
    np.testing.assert_allclose(extractor.features(videos, batch_size=16), feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(extractor.features(list(videos)), feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(extractor.features(v for v in videos), feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(extractor.features(torch.from_numpy(videos)), feats, rtol=1e-5, atol=1e-5)


def test_compute_fvd_end_to_end(tiny_i3d):
    extractor = I3DFeatureExtractor(tiny_i3d, device="cpu", batch_size=4)
    real = _videos(1, 8)
    same = compute_fvd(real, real, extractor, batch_size=4)
    other_noise = compute_fvd(real, _videos(2, 8), extractor, batch_size=4)
    brighter = compute_fvd(real, _videos(3, 8, low=128), extractor, batch_size=4)
    assert abs(same) < 1e-6
    assert other_noise > 0
    assert brighter > 10 * other_noise  # a real shift in the distribution scores far worse than resampling


# ---------------------------------------------------------------------------------------------------------------------
# Command-line tool
# ---------------------------------------------------------------------------------------------------------------------


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbp_ds.cli.eval_fvd", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_tool_refuses_without_detector():
    proc = _run_tool("--real", "x", "--fake", "y", "--i3d", "/nonexistent.pt")
    assert proc.returncode == 2, proc.stderr
    assert "i3d_torchscript.pt" in proc.stderr and "--i3d PATH" in proc.stderr
    assert "cannot be downloaded" in proc.stderr
    # Omitting --i3d altogether gets the same explanation, not just "argument required".
    proc = _run_tool("--real", "x", "--fake", "y")
    assert proc.returncode == 2 and "i3d_torchscript.pt" in proc.stderr


def test_tool_help():
    proc = _run_tool("--help")
    assert proc.returncode == 0
    for flag in ("--real", "--fake", "--i3d", "--num-frames", "--max-videos", "--batch-size", "--device", "--json"):
        assert flag in proc.stdout


def test_tool_end_to_end_npy_and_mp4(tiny_i3d, tmp_path):
    real_dir, fake_dir = tmp_path / "real", tmp_path / "fake"
    real_dir.mkdir()
    fake_dir.mkdir()
    for i, v in enumerate(_videos(5, 4)):
        np.save(real_dir / f"r{i}.npy", v)
    for i, v in enumerate(_videos(6, 4, low=100)):
        np.save(fake_dir / f"f{i}.npy", v)
    np.save(fake_dir / "short.npy", _videos(7, 1, t=5)[0])
    has_ffmpeg = all(map(ffmpeg_tools.find_tool, ffmpeg_tools.TOOLS))
    if has_ffmpeg:  # one real mp4 among the real clips exercises the ffmpeg decoding path
        subprocess.run([ffmpeg_tools.ffmpeg(), "-v", "error", "-f", "lavfi",
                        "-i", "testsrc=size=40x24:rate=8:duration=3", "-pix_fmt", "yuv420p",
                        str(real_dir / "r9.mp4")], check=True, timeout=60)

    out = tmp_path / "res" / "fvd.json"
    args = ["--real", str(real_dir), "--fake", str(fake_dir / "*.npy"), "--i3d", str(tiny_i3d),
            "--device", "cpu", "--batch-size", "2", "--json", str(out)]
    proc = _run_tool(*args)
    assert proc.returncode == 1 and "short.npy" in proc.stderr and "--skip-short" in proc.stderr

    proc = _run_tool(*args, "--skip-short")
    assert proc.returncode == 0, proc.stderr
    assert "FVD:" in proc.stdout
    result = json.loads(out.read_text())
    assert result["num_real"] == (5 if has_ffmpeg else 4) and result["num_fake"] == 4
    assert result["skipped_fake"] == 1 and result["fvd"] > 0

    proc = _run_tool(*args, "--skip-short", "--max-videos", "3")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["num_real"] == 3 and result["num_fake"] == 3


def test_decode_mp4_matches_frame_count(tmp_path):
    if not all(map(ffmpeg_tools.find_tool, ffmpeg_tools.TOOLS)):
        pytest.skip(f"ffmpeg/ffprobe not installed: {ffmpeg_tools.INSTALL_HINT}")
    from nbp_ds.video_io import decode_video

    path = tmp_path / "v.mp4"
    subprocess.run([ffmpeg_tools.ffmpeg(), "-v", "error", "-f", "lavfi", "-i", "testsrc=size=40x24:rate=10:duration=2",
                    "-pix_fmt", "yuv420p", str(path)], check=True, timeout=60)
    clip = decode_video(path, max_frames=16)  # FVD's reading: stored rate and size, the first frames
    assert clip.shape == (16, 24, 40, 3) and clip.dtype == np.uint8
    assert decode_video(path, max_frames=100).shape[0] == 20  # short video: all of its frames, no padding


def test_tool_reads_long_videos_window_by_window(tiny_i3d, tmp_path):
    """--window-frames 10: one FVD per window index, each the FVD of the hand-cut frames [10(k-1), 10(k-1) + 8)
    of every video that holds a whole window k (computed here with compute_fvd on those arrays). Windows 1, 2 and
    3 of the long videos are noise a little, much and the other way off the real clips' (window 3 only in the
    four 34-frame videos: the 29-frame ones end 1 frame short of it); FVD 1 is the FVD read without windows."""
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, size=(6, 17, 24, 32, 3), dtype=np.uint8)
    first = rng.integers(30, 256, size=(6, 10, 24, 32, 3), dtype=np.uint8)
    brighter = rng.integers(100, 256, size=(6, 10, 24, 32, 3), dtype=np.uint8)
    darker = rng.integers(0, 120, size=(4, 14, 24, 32, 3), dtype=np.uint8)
    real_dir, fake_dir = tmp_path / "real", tmp_path / "fake"
    real_dir.mkdir()
    fake_dir.mkdir()
    for i in range(6):
        np.save(real_dir / f"r{i}.npy", real[i])
        tail = darker[i] if i < 4 else darker[0, :9]
        np.save(fake_dir / f"f{i}.npy", np.concatenate([first[i], brighter[i], tail]))
    np.save(fake_dir / "short.npy", first[0, :9])  # not one whole window: left out with --skip-short
    extractor = I3DFeatureExtractor(tiny_i3d, num_frames=8)
    expected = [compute_fvd(real[:, :8], clips, extractor) for clips in (first[:, :8], brighter[:, :8], darker[:, :8])]
    assert 0 < expected[0] < expected[1] and expected[2] > expected[0]  # three distinct distances

    out = tmp_path / "fvd.json"
    args = ["--real", str(real_dir), "--fake", str(fake_dir), "--i3d", str(tiny_i3d), "--num-frames", "8",
            "--device", "cpu", "--json", str(out)]
    proc = _run_tool(*args, "--window-frames", "10", "--skip-short")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["skipped_fake"] == 1 and result["window_frames"] == 10
    assert [w["window"] for w in result["windows"]] == [1, 2, 3]
    assert [w["num_fake"] for w in result["windows"]] == [6, 6, 4]
    np.testing.assert_allclose([w["fvd"] for w in result["windows"]], expected, rtol=1e-6)
    assert "20-29" in proc.stdout  # the table names each window's frames
    with pytest.raises(ValueError, match=r"short\.npy: shorter than one window of 10 frames"):
        eval_fvd.run(eval_fvd.build_parser().parse_args([*args, "--window-frames", "10"]))
    (fake_dir / "short.npy").unlink()
    plain = eval_fvd.run(eval_fvd.build_parser().parse_args(args))  # in this process: a second start saves seconds
    assert plain["fvd"] == pytest.approx(result["windows"][0]["fvd"], rel=1e-6) and "windows" not in plain
    with pytest.raises(UsageError, match="--window-frames 6 is shorter than --num-frames 8"):
        eval_fvd.run(eval_fvd.build_parser().parse_args([*args, "--window-frames", "6"]))
