"""Videos -> nbp-tokenize -> shards -> loader, end to end with real ffmpeg and real tar files."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from video_fixtures import dataset, ffmpeg, lavfi_video

from nbp_ds.data import DataReport, RetryPolicy, build_loader, decode_sample, read_shard
from nbp_ds.data.packer import PackSpec
from nbp_ds.layout import Layout
from nbp_ds.tokenizer.dataset_listing import sample_key

ROOT = Path(__file__).resolve().parents[1]
CLIP = ["--frames", "9", "--resolution", "32", "--fps", "8", "--tokenizer", "random:tiny"]
GRID = (3, 8, 8)


COMMAND = ("-m", "nbp_ds.cli.tokenize")
WITH_FAULTS = ("tests/faults.py", "tokenize-faults")  # nbp-tokenize with the decode faults of NBP_FAULTS


def tokenize(videos: Path, out: Path, *extra: str, env: dict | None = None, program: tuple[str, ...] = COMMAND,
             cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *program, "--videos", str(videos), "--out", str(out), *CLIP,
           "--clips-per-video", "2", "--shard-size", "2", "--no-progress", *extra]
    env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def failures(out: Path) -> dict[str, dict]:
    """failures.jsonl as {video: its row}."""
    return {row["video"]: row for row in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}


def shard_members(out: Path) -> dict[str, bytes]:
    """Every member of every shard (tokens, label, metadata of each clip) by name, whatever shard holds it."""
    members = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
    return members


def without_video(members: dict[str, bytes], rel: str) -> dict[str, bytes]:
    """The shard members of every video but ``rel`` (its clips' keys start with the video's key)."""
    prefix = sample_key(rel, 0).rsplit("__c", 1)[0] + "__c"
    return {name: data for name, data in members.items() if not name.startswith(prefix)}


def processes_mentioning(text: str) -> list[int]:
    """Process ids whose command line holds ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return found


def keys_from_loader(shards: Path, ranks: int = 2, workers: int = 2) -> list[str]:
    keys = []
    for rank in range(ranks):
        loader = build_loader(shards, grid=GRID, batch_size=3, mode="val", rank=rank, world_size=ranks,
                              num_workers=workers, with_keys=True)
        keys += [k for batch in loader for k in batch["key"]]
    return keys


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return dataset(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def tokenized(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    result = tokenize(videos, out, "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 videos" not in result.stdout  # 8 files listed, 2 of them fail
    assert "8 videos -> 12 clips, 2 failed" in result.stdout, result.stdout
    return out


def test_every_clip_once_across_ranks_and_workers(tokenized):
    keys = keys_from_loader(tokenized)
    assert len(keys) == len(set(keys)) == 12
    assert {k.rsplit("__c", 1)[0] for k in keys} == {f"class{c}__v{i:02d}" for c in (0, 1) for i in range(3)}
    assert json.loads((tokenized / "classes.json").read_text()) == {"class0": 0, "class1": 1}
    labels = [int(b["label"][i]) for b in build_loader(tokenized, grid=GRID, batch_size=4, mode="val",
                                                       num_workers=0, with_keys=True)
              for i in range(len(b["label"]))]
    assert sorted(labels) == [0] * 6 + [1] * 6


def test_failures_are_listed_with_reasons(tokenized):
    rows = [json.loads(line) for line in (tokenized / "failures.jsonl").read_text().splitlines()]
    assert {(r["video"], r["reason"]) for r in rows} == {("class0/broken.mp4", "unreadable"),
                                                          ("class1/short.mp4", "too_short")}


def test_every_file_is_accounted_for(tmp_path):
    """A video, an audio-only .m4a, a .txt and a broken .mp4: one clip, and the three others named with why."""
    folder = tmp_path / "mixed"
    lavfi_video(folder / "good.mp4")
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440", "-t", "2", str(folder / "song.m4a"))
    (folder / "notes.txt").write_text("shot list")
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    out = tmp_path / "out"
    result = tokenize(folder, out, "--workers", "0", "--clips-per-video", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 videos -> 1 clips, 1 failed, 2 other file(s) not taken" in result.stdout, result.stdout
    rows = {json.loads(line)["video"]: json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()}
    assert {name: row["reason"] for name, row in rows.items()} == {
        "song.m4a": "not_a_video", "notes.txt": "not_a_video", "broken.mp4": "unreadable"}
    assert ".m4a is not a video file type" in rows["song.m4a"]["detail"]
    assert len(keys_from_loader(out, ranks=1, workers=0)) == 1


def test_inspect_shards_reports(tokenized, tmp_path):
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.inspect_shards", str(tokenized), "--json",
                             str(tmp_path / "r"), "--expect-grid", "3,8,8"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "r").read_text())
    assert report["samples"] == 12 and report["duplicate_keys"] == 0 and report["shapes"] == {"3x8x8": 12}
    assert report["labels"] == {"0": 6, "1": 6} and 0 <= report["token_min"] <= report["token_max"] < 1000


def test_a_corrupt_member_is_skipped_and_counted(tokenized, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    victim = sorted(tokenized.glob("*.tar"))[0]
    for shard in tokenized.glob("*.tar"):
        (shards / shard.name).write_bytes(shard.read_bytes())
    with tarfile.open(victim) as src, tarfile.open(shards / victim.name, "w") as dst:
        damaged = False
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith("tokens.npy") and not damaged:
                data, damaged = b"garbage" * 10, True
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    loader = build_loader(shards, grid=GRID, batch_size=4, mode="val", num_workers=2, with_keys=True)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 11 and loader.stats()["corrupt"] == 1
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.inspect_shards", str(shards)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "1 member(s)" in result.stdout


def test_interrupted_run_resumes_without_loss_or_duplicates(videos, tokenized, tmp_path):
    out = tmp_path / "out"
    # decoding slowed down (tests/faults.py; inline decoding so the slow-down applies) so the run can be killed midway
    cmd = [sys.executable, "tests/faults.py", "tokenize", "0.5", "--videos", str(videos), "--out", str(out), *CLIP,
           "--clips-per-video", "2", "--shard-size", "2", "--no-progress", "--workers", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while len(list((out / "manifests").glob("*.json"))) < 2 and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(list((out / "manifests").glob("*.json"))) < 8  # really interrupted midway
    result = tokenize(videos, out, "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard(s) already done" in result.stdout and " 0 shard(s) already done" not in result.stdout
    assert not list(out.glob(".*tmp*"))
    assert sorted(keys_from_loader(out)) == sorted(keys_from_loader(tokenized))
    rows = (out / "failures.jsonl").read_text().splitlines()
    assert len(rows) == 2  # failures from both runs, each once


def test_array_tasks_write_disjoint_shards_covering_everything(videos, tokenized, tmp_path):
    out = tmp_path / "array"
    for task in (0, 1):
        result = tokenize(videos, out, "--workers", "1",
                          env={"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": str(task)})
        assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in out.glob("*.tar"))
    assert any("-t000-" in n for n in names) and any("-t001-" in n for n in names)
    assert sorted(keys_from_loader(out)) == sorted(keys_from_loader(tokenized))
    assert {p.name for p in out.glob("failures*.jsonl")} == {"failures-t000.jsonl", "failures-t001.jsonl"}


def test_a_worker_that_dies_loses_only_its_video(videos, tokenized, tmp_path):
    """A worker killed while decoding one video (SIGKILL, as a decoder crash or the OOM killer): that video is
    listed as worker_died, the video the other worker held at that moment (v02, in flight by then) is not
    blamed, the run finishes, and every other clip is in the shards byte for byte as in a run without the fault."""
    out, pids = tmp_path / "out", tmp_path / "pids"
    pids.mkdir()
    faults = {"decode_kill": ["class0/v01.mp4"], "kill_when": ["class0/v02.mp4"], "decode_pids": str(pids),
              "decode_sleep": {"class0/v02.mp4": 2}}
    result = tokenize(videos, out, "--workers", "2", program=WITH_FAULTS, env={"NBP_FAULTS": json.dumps(faults)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 videos -> 10 clips, 3 failed" in result.stdout, result.stdout
    rows = failures(out)
    assert {video: row["reason"] for video, row in rows.items()} == {
        "class0/broken.mp4": "unreadable", "class1/short.mp4": "too_short", "class0/v01.mp4": "worker_died"}
    assert "killed by SIGKILL" in rows["class0/v01.mp4"]["detail"]
    expected = without_video(shard_members(tokenized), "class0/v01.mp4")
    assert len(expected) == 3 * 10  # tokens, label and metadata of the 10 clips
    assert shard_members(out) == expected


def test_a_hung_decoder_and_a_file_that_never_answers_are_stopped_at_the_timeout(videos, tokenized, tmp_path):
    """A decoding that never returns, and a named pipe called stuck.mp4 (its reads never return, like those of a
    file on a hung network file system): both listed as timeout after --video-timeout, their processes (the
    worker, and the ffmpeg reading the pipe) gone, every other clip in the shards as without the faults."""
    folder = shutil.copytree(videos, tmp_path / "videos")
    os.mkfifo(folder / "class1" / "stuck.mp4")
    pids, out = tmp_path / "pids", tmp_path / "out"
    pids.mkdir()
    faults = {"decode_hang": ["class0/v02.mp4"], "decode_pids": str(pids)}
    result = tokenize(folder, out, "--workers", "2", "--video-timeout", "5", program=WITH_FAULTS,
                      env={"NBP_FAULTS": json.dumps(faults)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "9 videos -> 10 clips, 4 failed" in result.stdout, result.stdout
    rows = failures(out)
    assert {video: row["reason"] for video, row in rows.items()} == {
        "class0/broken.mp4": "unreadable", "class1/short.mp4": "too_short", "class0/v02.mp4": "timeout",
        "class1/stuck.mp4": "timeout"}
    assert "not done after 5 s" in rows["class1/stuck.mp4"]["detail"]
    assert shard_members(out) == without_video(shard_members(tokenized), "class0/v02.mp4")
    hung_worker = int((pids / "class0__v02.mp4").read_text())
    assert not Path(f"/proc/{hung_worker}").exists(), "the hung worker outlived the run"
    assert processes_mentioning(str(folder / "class1" / "stuck.mp4")) == [], "ffmpeg reading the pipe outlived the run"


def test_the_tools_alias_tokenizes_a_real_folder(videos, tokenized, tmp_path):
    """`python tools/tokenize_videos.py` (the stable surface) with decoding workers, run from elsewhere, does what
    nbp-tokenize does. Its workers are spawned and import the main module again: they must not run the command."""
    out = tmp_path / "out"
    result = tokenize(videos, out, "--workers", "2", program=(str(ROOT / "tools" / "tokenize_videos.py"),),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 videos -> 12 clips, 2 failed" in result.stdout, result.stdout
    assert shard_members(out) == shard_members(tokenized)
    assert (out / "failures.jsonl").read_text() == (tokenized / "failures.jsonl").read_text()


def test_bad_arguments_are_refused_by_name(videos, tmp_path):
    result = tokenize(tmp_path / "nothing", tmp_path / "o")
    assert result.returncode == 2 and "nothing: no such folder or file" in result.stderr
    result = tokenize(videos, tmp_path / "o", "--frames", "8")
    assert result.returncode == 2 and "clips need 1 + 4k frames" in result.stderr
    result = tokenize(videos, tmp_path / "o", "--tokenizer", str(tmp_path / "tok"))
    assert result.returncode == 2 and "tok: expected a folder with config.json" in result.stderr
    result = tokenize(videos, tmp_path / "o", "--video-timeout", "0")
    assert result.returncode == 2 and "--video-timeout must be > 0 seconds, got 0.0" in result.stderr


@pytest.mark.slow
def test_a_timed_out_video_is_retried_by_deleting_the_manifest_that_names_it(videos, tokenized, tmp_path):
    """README: a rerun keeps finished shards; to retry a video that timed out, delete the manifest that names it
    (`grep -l NAME OUT/manifests/*.json`) and run the same command: the shards and failures.jsonl are then those of
    a run in which it never hung."""
    out = tmp_path / "out"
    faults = {"decode_hang": ["class0/v02.mp4"]}
    hung = tokenize(videos, out, "--workers", "2", "--video-timeout", "2", program=WITH_FAULTS,
                    env={"NBP_FAULTS": json.dumps(faults)})
    assert hung.returncode == 0 and failures(out)["class0/v02.mp4"]["reason"] == "timeout", hung.stderr[-3000:]
    naming = [m for m in (out / "manifests").glob("*.json") if "class0/v02.mp4" in m.read_text()]
    assert len(naming) == 1, naming
    naming[0].unlink()
    again = tokenize(videos, out, "--workers", "2", "--video-timeout", "60")  # the decoder no longer hangs
    assert again.returncode == 0, again.stderr[-3000:]
    assert shard_members(out) == shard_members(tokenized)
    assert (out / "failures.jsonl").read_text() == (tokenized / "failures.jsonl").read_text()


@pytest.mark.slow
def test_the_array_script_lists_a_video_past_video_timeout_and_the_task_goes_on(videos, tokenized, tmp_path):
    """slurm/README.md: `--video-timeout` passed after slurm/tokenize.sbatch's name reaches nbp-tokenize; a video
    still decoding then (a named pipe whose reads never return, as on a hung file system) is listed in that task's
    failures-t<i>.jsonl and the tasks finish, their shards holding every other clip. Run outside Slurm, each task
    given its array variables as Slurm would."""
    folder = shutil.copytree(videos, tmp_path / "videos")
    os.mkfifo(folder / "class1" / "stuck.mp4")
    out = tmp_path / "out"
    listed = {}
    for task in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(NBP_CPU="1", OMP_NUM_THREADS="1", SLURM_CPUS_PER_TASK="1", SLURM_ARRAY_TASK_ID=str(task),
                   SLURM_ARRAY_TASK_COUNT="2", VIDEOS=str(folder), OUT=str(out), TOKENIZER="random:tiny")
        done = subprocess.run(["bash", "slurm/tokenize.sbatch", *CLIP[:6], "--clips-per-video", "2",
                               "--shard-size", "2", "--video-timeout", "3"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        rows = out / f"failures-t{task:03d}.jsonl"
        listed.update({row["video"]: row for row in map(json.loads, rows.read_text().splitlines())})
    assert listed["class1/stuck.mp4"]["reason"] == "timeout", listed
    assert "not done after 3 s" in listed["class1/stuck.mp4"]["detail"]
    assert {video: row["reason"] for video, row in listed.items()} == {
        **{video: row["reason"] for video, row in failures(tokenized).items()}, "class1/stuck.mp4": "timeout"}
    assert shard_members(out) == shard_members(tokenized)
    assert processes_mentioning(str(folder / "class1" / "stuck.mp4")) == [], "ffmpeg reading the pipe outlived the run"


def test_several_lengths_and_sizes_give_each_clip_its_own_grid(tmp_path):
    """--frames 9,17 --resolution 32,32x48: each video gives a clip of both lengths at the size nearest its aspect
    (a 64x48 video: 32x48; a 48x64 one: 32x32), every sample with its own grid and size in its metadata, and a
    packing loader reads them all."""
    lavfi_video(tmp_path / "videos" / "wide.mp4", size="64x48", seconds=3.0)
    lavfi_video(tmp_path / "videos" / "tall.mp4", size="48x64", seconds=3.0, source="testsrc2")
    out = tmp_path / "out"
    result = tokenize(tmp_path / "videos", out, "--frames", "9,17", "--resolution", "32,32x48",
                      "--clips-per-video", "1", "--workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    samples = {}
    shards = sorted(out.glob("*.tar"))
    for _, sample in (item for shard in shards for item in read_shard(str(shard), policy=RetryPolicy(0, 0),
                                                                       report=DataReport())):
        tokens, _, meta = decode_sample(sample)
        samples[(meta["source"], meta["frames"])] = (tokens.shape, meta["resolution"])
    # random:tiny: 1 + (frames - 1) / 4 latent frames, 4x spatial
    assert samples == {("wide.mp4", 9): ((3, 8, 12), [32, 48]), ("wide.mp4", 17): ((5, 8, 12), [32, 48]),
                       ("tall.mp4", 9): ((3, 8, 8), 32), ("tall.mp4", 17): ((5, 8, 8), 32)}
    layout = Layout(grid=(3, 8, 8), block=(1, 4, 4), vocab_size=1000)
    loader = build_loader(out, grid=None, batch_size=1, mode="val", num_workers=0, with_keys=True,
                          pack=PackSpec(layout, 512))
    assert sum(len(b["key"]) for b in loader) == 4
