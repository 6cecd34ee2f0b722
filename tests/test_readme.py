"""The READMEs' commands are true: every program they run exists, every flag they pass is one its --help
lists, every run-config override is a valid key and value, and every script or file they name is there."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nbp_ds.config import available_configs, load_config

ROOT = Path(__file__).resolve().parents[1]
# the README, the Slurm scripts' README and the reference pages of docs/ it links
READMES = [ROOT / "README.md", ROOT / "slurm" / "README.md",
           *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "PROMISES.md")]


def shell_commands(markdown: str) -> list[str]:
    """Commands of the ```bash blocks: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def invocations(command: str) -> list[list[str]]:
    """The program invocations in one shell line (split at &&, ;, |), environment assignments removed."""
    found = []
    for part in re.split(r"&&|;|\|", command):
        words = shlex.split(part.replace("$(", "").replace(")", ""), posix=True)
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words = words[1:]
        if words:
            found.append(words)
    return found


@functools.cache
def help_text(module: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, f"{module} --help failed: {result.stderr[-2000:]}"
    return result.stdout


def console_scripts() -> dict[str, str]:
    """nbp-* command -> its module, from pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return {m[0]: m[1] for m in re.findall(r'^(nbp-[\w-]+)\s*=\s*"([\w.]+):main"', section, flags=re.M)}


def module_of(words: list[str]) -> tuple[str | None, list[str]]:
    """(python module the invocation runs, its arguments), or (None, []) for other programs."""
    scripts = console_scripts()
    if words[0] in scripts:
        return scripts[words[0]], words[1:]
    if "-m" in words and words[0] in ("python", "python3", "torchrun", "srun", "deepspeed"):
        i = words.index("-m")
        return words[i + 1], words[i + 2:]
    if words[0] == "torchrun" and "-m" not in words:
        return None, []
    return None, []


ALL = [(readme.name, command) for readme in READMES for command in shell_commands(readme.read_text())]


def test_the_readmes_have_commands():
    assert len(ALL) > 15


@pytest.mark.parametrize("where, command", ALL, ids=[f"{w}:{c[:60]}" for w, c in ALL])
def test_readme_command(where, command):
    for words in invocations(command):
        program = words[0]
        if program.startswith("nbp-"):
            assert program in console_scripts(), f"{program} is not a console script in pyproject.toml"
        module, args = module_of(words)
        if module is not None and module.startswith("nbp_ds"):
            text = help_text(module)
            for flag in (a.split("=")[0] for a in args if a.startswith("--")):
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{module} has no {flag}"
            if module in ("nbp_ds.train", "nbp_ds.cli.train") and "--config" in args:
                config = args[args.index("--config") + 1]
                if not (ROOT / config).is_file() and config not in available_configs():
                    config = "tiny"  # a file the user makes first (a converted model's config): check the keys
                overrides = [a for a in args if re.fullmatch(r"[a-z_]+\.[a-z_.]+=.*", a)]
                cfg = load_config(config, [o for o in overrides if not o.endswith("=...")])  # refuses bad keys
                for placeholder in (o[:-4] for o in overrides if o.endswith("=...")):  # key=... in prose
                    section, _, key = placeholder.partition(".")
                    assert key in cfg.to_dict().get(section, {}), f"no config key {placeholder}"
        if program in ("bash", "sbatch", "source"):
            scripts = [w for w in words[1:] if w.endswith((".sh", ".sbatch"))]
            for script in scripts:
                assert (ROOT / script).is_file(), f"{script} does not exist"
        if program == "make":
            targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
            assert all(t in targets for t in words[1:] if not t.startswith("-")), f"make {words[1:]}"


def test_the_readmes_point_only_inside_the_repository():
    """Links and quoted paths name files of the project (none outside the checkout, none missing)."""
    for readme in READMES:
        text = readme.read_text()
        outside = re.findall(r"`(\.\./[^`]*)`", text)
        assert not outside, f"{readme.name} names files outside the repository: {outside}"
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (readme.parent / target).resolve()
            assert resolved.is_relative_to(ROOT.resolve()), f"{readme.name} links outside the repository: {target}"
            assert resolved.exists(), f"{readme.name} links a missing file: {target}"


def test_the_readme_states_the_python_the_package_requires():
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"Python {requires.replace('>=', '>= ')}" in (ROOT / "README.md").read_text()


def test_every_command_has_help():
    """"Every tool has --help": each nbp-* console script, those the READMEs run and the others."""
    scripts = console_scripts()
    assert len(scripts) > 15
    for program, module in scripts.items():
        assert help_text(module).startswith("usage:"), program


def pytest_parts(target: str) -> list[tuple[str, bool]]:
    """The pytest runs `make -n TARGET` prints: (marker expression, runs on parallel workers)."""
    dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True)
    parts = []
    for command in re.split(r";|&&|\n", dry.stdout):
        words = shlex.split(command.replace("\\", " "))
        if "pytest" in words:
            after_pytest = words[words.index("pytest"):]
            parts.append((after_pytest[after_pytest.index("-m") + 1], "-n" in after_pytest))
    return parts


@pytest.mark.parametrize("target, wanted", [("test", "not gpu"), ("test-fast", "not gpu and not slow and not slurm")])
def test_make_test_and_test_fast_select_the_markers_they_say(target, wanted):
    """`make test`: every test but the gpu ones; `make test-fast`: not the slow or Slurm ones either. Each runs in
    two parts (most tests on parallel workers, then the Slurm and timing ones one at a time): over every
    combination of markers, a test runs in exactly one part when the README's expression selects it, in none
    otherwise, and never on parallel workers when it is Slurm or timing."""
    from _pytest.mark.expression import Expression

    parts = pytest_parts(target)
    assert len(parts) == 2 and [parallel for _, parallel in parts] == [True, False], parts
    names = ("gpu", "slow", "slurm", "timing")
    for bits in range(2 ** len(names)):
        marks = {name for i, name in enumerate(names) if bits >> i & 1}
        selected = [Expression.compile(expr).evaluate(marks.__contains__) for expr, _ in parts]
        assert sum(selected) == Expression.compile(wanted).evaluate(marks.__contains__), (marks, parts)
        assert not (selected[0] and marks & {"slurm", "timing"}), (marks, parts)
    markers = (ROOT / "pyproject.toml").read_text()
    assert all(f'"{m}:' in markers for m in names)


def test_make_gpu_check_installs_nothing():
    # `make gpu-check` runs no set-up first: it never installs the CPU torch on a GPU machine
    dry = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "nbp_ds.cli.gpu_check" in dry.stdout and "setup_env" not in dry.stdout
