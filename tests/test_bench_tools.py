"""The benchmarks run end to end on tiny settings and print their tables (figures are not checked:
speed targets live in the benchmarks' output, not in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the generation benchmarks time a 4x256 model with 64,000 codes by default; what these tests check (passes,
# the table's arithmetic, the notes) does not depend on the size, so they time a model a tenth of a second builds
TINY_MODEL = ("model.n_layer=2", "model.d_model=64", "model.vocab_size=64")


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_bench_train_reports_an_unavailable_backend_and_measures_the_rest():
    result = run_tool("-m", "nbp_ds.cli.bench_train", "--config", "tiny", "--attention", "sdpa", "flex",
                      "--steps", "2", "--warmup", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert rows["sdpa"][-3].replace(",", "").isdigit()  # tokens/s measured
    assert "not measured: flex" in result.stdout and "no backward pass on CPU" in result.stdout


def bench_rows(stdout: str) -> dict[tuple[str, int], list[str]]:
    """(variant, batch) -> the row's fields, for the table rows of nbp-bench-generate."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith(("NBP", "NTP")) and not line.startswith("NTP/NBP"):
            fields = line.split()
            rows[fields[0] + " " + fields[1], int(fields[2])] = fields[3:]
    return rows


def test_bench_generate_counts_forward_passes_on_the_configs_grid():
    result = run_tool("-m", "nbp_ds.cli.bench_generate", "--config", "tiny", "--repeats", "1", "--batch-sizes", "1",
                      "2", "--sampling", "plain", *TINY_MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = bench_rows(result.stdout)
    # tiny: a 3x4x4 grid and a class token; NBP takes one row of 4 per pass, hybrid goes token by token
    # through the first block (4 + 3 = L + n - 1 passes with L = 12 blocks and n = 4)
    passes = {"NBP 1x1x4": 12, "NBP hybrid": 15, "NTP 1x1x1": 48}
    assert {key: int(fields[0]) for key, fields in rows.items()} == {(n, b): p for n, p in passes.items()
                                                                     for b in (1, 2)}
    for fields in rows.values():  # s/video, frames/s, videos/s agree (9 frames per video), up to their printed digits
        per_video, fps, vps = map(float, fields[1:4])
        assert fps == pytest.approx(9 / per_video, rel=0.01, abs=0.051)
        assert vps == pytest.approx(1 / per_video, rel=0.01, abs=0.0051)
    assert "decoder eager; bandwidth floor:" in result.stdout and "ms per pass" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("NTP/NBP wall clock: batch 1: NBP 1x1x4 ")


def test_bench_generate_estimates_long_decodes_at_large_batches_and_says_so():
    result = run_tool("-m", "nbp_ds.cli.bench_generate", "--config", "tiny", "--repeats", "1", "--batch-sizes", "1",
                      "32", "--sampling", "greedy", "--mode", "static", "--estimate-passes", "20", *TINY_MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = bench_rows(result.stdout)
    assert "decoder static;" in result.stdout
    assert " ".join(rows["NTP 1x1x1", 32][-6:]) == "estimated from 20 of 48 passes"
    assert not any("estimated" in f for key, fields in rows.items() if key != ("NTP 1x1x1", 32) for f in fields)


def test_bench_data_measures_the_loader_resume_and_tokenization():
    result = run_tool("-m", "nbp_ds.cli.bench_data", "--samples", "300", "--workers", "1", "--videos", "2",
                      "--preset", "tiny", "--resume-at", "640", "3200")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 worker(s):" in result.stdout and "samples/s" in result.stdout
    resumes = [line for line in result.stdout.splitlines() if "samples seen:" in line]
    assert len(resumes) == 2 and "640 samples seen" in resumes[0] and "3,200 samples seen" in resumes[1]
    assert "reading the stream again" in resumes[0]
    assert "tokenize: 2 clips" in result.stdout


def test_bench_tools_name_a_bad_config_key():
    result = run_tool("-m", "nbp_ds.cli.bench_train", "--config", "tiny", "model.n_hed=3")
    assert result.returncode == 2 and "model.n_hed" in result.stderr and "Traceback" not in result.stderr


def test_gpu_check_lists_its_steps_and_refuses_to_run_without_a_gpu():
    listed = run_tool("-m", "nbp_ds.cli.gpu_check", "--list")
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert {"gpu-tests", "train-700m", "optimizer", "generate-700m", "ulysses", "long-sample-700m",
            "3b-offload"} <= set(names)
    assert "nbp_ds.cli.bench_optimizer --device cuda" in listed.stdout  # the AdamW choice, measured there
    assert run_tool("-m", "nbp_ds.cli.gpu_check", "--only", "nope").stderr.startswith("error: no step 'nope'")
    result = run_tool("-m", "nbp_ds.cli.gpu_check", "--out", "/tmp/nbp-gpu-check-test")
    assert result.returncode == 2 and "no CUDA device" in result.stderr


@pytest.mark.slow
def test_bench_clip_stream_prints_memory_and_clips_per_second_without_ffmpeg_on_path(tmp_path):
    """nbp-bench-clip-stream makes its videos and reads them as every program does, through nbp_ds.ffmpeg_tools:
    with nothing on PATH it runs on the ffmpeg wheel's static build and prints one row per measurement."""
    import os

    from nbp_ds import ffmpeg_tools

    if ffmpeg_tools.packaged_tool("ffmpeg") is None:
        pytest.skip(f"the {ffmpeg_tools.WHEEL} wheel is not installed (make setup installs it)")
    empty = tmp_path / "empty_path"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.bench_clip_stream", "--videos", "3", "6",
                             "--workers", "1", "--cache-mb", "0", "--frames", "9", "--resolution", "32",
                             "--batch-size", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PATH": str(empty)})
    assert result.returncode == 0, result.stderr[-3000:]
    header, *rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert header[:3] == ["videos", "workers", "cache"] and "clips/s" in header
    assert [row[:3] for row in rows] == [["3", "1", "0"], ["6", "1", "0"]]
    assert all(float(value) > 0 for row in rows for value in row[3:])  # clips/s, per worker, both peak RSS


def test_bench_packing_prints_padding_and_tokens_per_second(capsys):
    """12 clips of 49 positions (tiny, grid 3x4x4): packed two to a row of 128 -> 6 rows, 1 - 588/768 = 23.4%
    padding; padded one to a row of 49 -> 12 rows, no padding."""
    from nbp_ds.cli import bench_packing

    assert bench_packing.main(["--grids", "3x4x4", "--clips", "12", "--repeats", "1", "--warmup", "0"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["packed"][1:4] == ["6", "128", "23.4%"] and rows["padded"][1:4] == ["12", "49", "0.0%"]
    assert all(float(r[5].replace(",", "")) > 0 for r in rows.values())
    assert bench_packing.main(["--grids", "3x4"]) == 2


def test_bench_long_sample_counts_the_passes_of_each_window():
    """tiny: a 3x4x4 clip in blocks of 4 tokens = 12 passes for 9 frames; 13 frames add one latent frame, 4 passes,
    and recompute one more (its pass over the window's given frames)."""
    result = run_tool("-m", "nbp_ds.cli.bench_long_sample", "--config", "tiny", *TINY_MODEL, "--frames", "9", "13",
                      "--decoders", "eager", "--long-modes", "rolling", "recompute")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(line.split()[1], int(line.split()[2])): int(line.split()[3])
            for line in result.stdout.splitlines() if line.startswith("eager ")}
    assert rows == {("rolling", 9): 12, ("rolling", 13): 16, ("recompute", 9): 12, ("recompute", 13): 17}
    refused = run_tool("-m", "nbp_ds.cli.bench_long_sample", "--config", "tiny", "--frames", "11")
    assert refused.returncode == 2 and "--frames must be 1 + 4k and at least the clip's 9, got [11]" in refused.stderr
