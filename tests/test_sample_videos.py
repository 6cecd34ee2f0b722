"""Sample videos people look at: the trainer logs animated GIFs to TensorBoard, tagged with the class name; a
frame-prediction model's panels show the real clip and its continuation with the given frames outlined in green
and the predicted ones in red. Real DeepSpeed (ZeRO-3, gloo, one process), a real (random) tokenizer, the event
files read back with TensorBoard's own reader."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_helpers import run

from nbp_ds.data import TokenShardWriter
from nbp_ds.runtime.metrics import MetricsLogger
from nbp_ds.tokenizer import build_tokenizer
from nbp_ds.visualize import GIVEN_COLOR, PREDICTED_COLOR, mark_given_frames
from tests.system_packages import ensure_packages

CLASSES = ["ApplyEyeMakeup", "Archery", "Basketball", "Biking"]


def logged_images(tb_dir) -> dict[str, list]:
    events = EventAccumulator(str(tb_dir), size_guidance={"images": 0})
    events.Reload()
    return {tag: events.Images(tag) for tag in events.Tags()["images"]}


def gif_frames(encoded: bytes) -> list[np.ndarray]:
    gif = Image.open(io.BytesIO(encoded))
    assert gif.format == "GIF"
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB")))
    return frames


def test_a_video_is_an_animated_gif_in_tensorboard(tmp_path):
    video = np.zeros((5, 16, 24, 3), dtype=np.uint8)
    for i in range(5):
        video[i, :, :, 0] = 40 * i  # a red ramp, a different frame each time
    logger = MetricsLogger(tmp_path, enabled=True)
    logger.video("samples/3_Archery", video, step=7, fps=4)
    logger.close()
    (image,) = logged_images(tmp_path / "tb")["samples/3_Archery"]
    assert image.step == 7 and (image.height, image.width) == (16, 24)
    frames = gif_frames(image.encoded_image_string)
    assert len(frames) == 5
    assert [int(f[8, 12, 0]) for f in frames] == [0, 40, 80, 120, 160]


def test_given_frames_are_outlined_apart_from_predicted_ones():
    video = np.full((4, 6, 6, 3), 128, dtype=np.uint8)
    marked = mark_given_frames(video, given=1)
    assert tuple(marked[0, 0, 3]) == GIVEN_COLOR and tuple(marked[0, 3, 5]) == GIVEN_COLOR
    assert all(tuple(marked[i, 5, 2]) == PREDICTED_COLOR for i in (1, 2, 3))
    assert (marked[:, 1:-1, 1:-1] == 128).all()  # the picture itself untouched


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Token shards on the quickstart grid (3x8x8, 1,000 codes) with named classes, and a tokenizer for them."""
    tmp = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(0)
    with TokenShardWriter(tmp / "shards", maxcount=32) as writer:
        for i in range(32):
            writer.write(f"clip{i:04d}", rng.integers(0, 1000, (3, 8, 8)), i % 4, {})
    (tmp / "shards" / "classes.json").write_text(json.dumps({name: i for i, name in enumerate(CLASSES)}))
    build_tokenizer("tiny", seed=1).save(tmp / "tok")
    return tmp


def train_with_samples(assets, out, *overrides: str):
    result = run([sys.executable, "-m", "nbp_ds.train", "--config", "quickstart", f"data.train={assets / 'shards'}",
                  f"train.out_dir={out}", f"train.sample_tokenizer={assets / 'tok'}", "train.steps=2",
                  "train.sample_every=2", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
                  "train.micro_batch=2", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
                  "data.num_workers=0", *overrides])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return logged_images(out / "tb")


@pytest.fixture(scope="module")
def class_run(assets):
    out = assets / "class_run"
    return out, train_with_samples(assets, out, "layout.num_classes=4")


def test_class_samples_are_videos_named_by_their_class(class_run):
    _, images = class_run
    tags = [f"samples/{i}_{name}" for i, name in enumerate(CLASSES)]
    assert sorted(images) == sorted([*tags, "samples/grid"])
    for tag in tags:
        (image,) = images[tag]
        frames = gif_frames(image.encoded_image_string)
        assert image.step == 2 and len(frames) == 9  # 3 latent frames: 1 + 4 + 4 video frames
        assert frames[0].shape[0] >= 128  # 32 pixels enlarged for the panel


def test_frame_prediction_samples_show_the_given_and_the_predicted_frames(assets, tmp_path):
    # frame prediction starts from given frames, so without the quickstart's token-by-token first frame
    images = train_with_samples(assets, tmp_path / "run", "layout.condition=frames", "layout.context_frames=1",
                                "layout.num_classes=0", "layout.hybrid=false", "layout.hybrid_blocks=1")
    assert sorted(images) == ["samples/0", "samples/1", "samples/grid"]
    frames = gif_frames(images["samples/0"][0].encoded_image_string)
    assert len(frames) == 9
    height, width = frames[0].shape[:2]
    half = (width - 8) // 2  # the real clip, a white gap, the model's continuation (each 32 pixels enlarged x4)
    for side in (0, width - half):  # the top-left pixel of each half: the outline (GIF palettes: nearly exact)
        assert close(frames[0][0, side], GIVEN_COLOR)  # 1 latent frame given = the first video frame
        assert all(close(f[height - 1, side], PREDICTED_COLOR) for f in frames[1:])


def close(pixel: np.ndarray, color: tuple[int, int, int]) -> bool:
    return bool(np.abs(pixel.astype(int) - np.array(color)).max() <= 16)


BROWSERS = ("chromium-headless-shell", "chromium")


@pytest.fixture(scope="session")
def browser() -> str:
    """A headless Chromium: Debian's chromium-headless-shell, installed with apt-get on first use where this
    process may (root, as CI runs `make test`), as the Slurm tests install Slurm."""
    ensure_packages(("chromium-headless-shell",), lambda: any(shutil.which(b) for b in BROWSERS), "headless Chromium")
    return next(shutil.which(b) for b in BROWSERS if shutil.which(b))


def test_tensorboard_shows_the_scalars_and_the_sample_videos_in_a_browser(class_run, browser, tmp_path):
    """What a user sees: TensorBoard serving the run folder, its page rendered by a headless Chromium."""
    out, _ = class_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(out / "tb"), "--port",
                               str(port), "--host", "127.0.0.1"], stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "tensorboard.log", "w"))
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "tensorboard.log").read_text()
                time.sleep(0.5)
        def rendered(tag_filter: str, *expected: str) -> str:
            """The Time Series page, cards filtered as a user would type it; loaded again (up to 3 times, as a user
            would reload) while it lacks one of ``expected``: the browser's virtual time does not wait for
            TensorBoard's data requests, so on a busy machine a dump can come before the cards are drawn."""
            page_url = f"{url}/?tagFilter={tag_filter}#timeseries"
            for _ in range(3):
                page = subprocess.run([browser, "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000",
                                       "--window-size=1600,3000", "--dump-dom", page_url],
                                      capture_output=True, text=True, timeout=180).stdout
                if all(text in page for text in expected):
                    break
            return page

        scalars = rendered("train%2Floss", "train/loss", "<line-chart", "<canvas")
        assert "train/loss" in scalars and "<line-chart" in scalars and "<canvas" in scalars  # a drawn chart
        tags = [f"samples/{i}_{name}" for i, name in enumerate(CLASSES)]
        page = rendered("samples", *tags, 'alt="Image at step 2"')
        for tag in tags:
            assert tag in page  # a video card per class, named
        images = re.findall(r'<img[^>]*alt="Image at step 2"[^>]*src="([^"]+)"', page)
        assert images, page[-2000:]
        shown = urllib.request.urlopen(f"{url}/{html.unescape(images[0])}", timeout=10).read()
        assert len(gif_frames(shown)) == 9  # what the page shows is the animated sample
    finally:
        server.terminate()
        server.wait(timeout=30)
