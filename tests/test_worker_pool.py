"""nbp_ds.worker_pool beyond what the tokenization tests show (tests/test_tokenize_pipeline.py: a dead
worker, a hung decoder, a file that never answers): results in order, a worker that cannot even start is an
error and not a hang, and a stuck worker does not outlive a run that was killed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path


def test_workers_that_cannot_start_end_the_run_with_an_error(tmp_path):
    """A script that maps without `if __name__ == "__main__":`: each spawned worker imports it again, tries to
    start workers of its own while it is being spawned, and dies. Replacing such workers forever is how
    multiprocessing.Pool hangs; the pool ends the run instead, saying why."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        from nbp_ds.worker_pool import ordered_map
        print(list(ordered_map(abs, [1, -2, 3], workers=1, timeout=60, window=2)))
    """))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "WorkerStartError" in result.stderr, result.stderr[-3000:]
    assert "exit code 1) before it started" in result.stderr and 'if __name__ == "__main__":' in result.stderr


def test_results_come_in_job_order(tmp_path):
    """abs over many jobs with fewer workers and a small window: every result, each in its job's place."""
    script = tmp_path / "guarded.py"
    script.write_text(textwrap.dedent("""
        from nbp_ds.worker_pool import ordered_map
        if __name__ == "__main__":
            print(list(ordered_map(abs, list(range(0, -40, -1)), workers=2, timeout=60, window=5)))
    """))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(list(range(40)))


def test_a_hung_worker_does_not_outlive_its_parent(tmp_path):
    """The run killed (SIGKILL: no cleanup of its own) while a worker is stuck: the worker ends too, it does not
    sit on the hung file forever."""
    marker = tmp_path / "worker-pid"
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        from nbp_ds.worker_pool import ordered_map

        def hang(marker):
            with open(marker + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(marker + ".tmp", marker)
            time.sleep(3600)

        if __name__ == "__main__":
            print(list(ordered_map(hang, [sys.argv[1]], workers=1, timeout=3600, window=1)))
    """))
    run = subprocess.Popen([sys.executable, str(script), str(marker)], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert run.poll() is None and time.monotonic() < deadline, "the worker never took its job"
        time.sleep(0.1)
    worker = Path(f"/proc/{marker.read_text()}")
    assert worker.exists()
    run.kill()
    run.wait()
    deadline = time.monotonic() + 30
    while worker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not worker.exists(), "the stuck worker outlived the run"
