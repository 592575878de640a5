"""The layout's rules: megatron-core behind one boundary, commands at the top, one loader."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

#: The one package allowed to import megatron, and what may do so besides it (and why).
BOUNDARY = "megatron_patches"
EXEMPT = {
    # The baseline the driver is measured against: a bare Megatron-Core loop, written as a
    # Megatron-LM user would, so it must call Megatron directly.
    "bench/step_overhead.py",
}


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _project_files() -> list[Path]:
    files = []
    for top in ("orchestration", "data_prep", "launch", "bench", BOUNDARY):
        files += sorted(p for p in (REPO / top).rglob("*.py") if p.is_file())
    return files


def megatron_imports(path: Path) -> list[str]:
    return [f"{path.relative_to(REPO)}:{line} imports {name}"
            for line, name in _imported_modules(path)
            if name == "megatron" or name.startswith("megatron.")]


def test_only_the_boundary_package_imports_megatron():
    offenders = [hit for path in _project_files()
                 if path.relative_to(REPO).parts[0] != BOUNDARY
                 and str(path.relative_to(REPO)) not in EXEMPT
                 for hit in megatron_imports(path)]
    assert not offenders, "megatron imported outside megatron_patches/:\n" + "\n".join(offenders)


def test_the_scanner_sees_imports_inside_functions():
    """The rule above would pass vacuously if the scanner missed imports: it must find the
    boundary's own (module level and function level alike)."""
    hits = megatron_imports(REPO / BOUNDARY / "configs.py")
    hits += megatron_imports(REPO / BOUNDARY / "parallel.py")
    assert any("megatron.core.transformer" in h for h in hits)
    assert any("megatron.core.tensor_parallel.random" in h for h in hits)
    for exempt in EXEMPT:
        assert megatron_imports(REPO / exempt), f"{exempt} no longer needs its exemption"


def test_top_level_orchestration_modules_are_commands():
    """Every file directly in orchestration/ is a `python -m orchestration.X` command (it has a
    __main__ guard); everything else lives in a sub-package by concern."""
    for path in sorted((REPO / "orchestration").glob("*.py")):
        if path.name == "__init__.py":
            continue
        assert 'if __name__ == "__main__":' in path.read_text(), f"{path.name} is no command"


def test_orchestration_never_imports_the_launch_scripts():
    hits = [f"{p.relative_to(REPO)}:{line}" for p in (REPO / "orchestration").rglob("*.py")
            for line, name in _imported_modules(p) if name == "launch" or name.startswith("launch.")]
    assert not hits, hits


def test_no_sys_path_surgery_in_data_prep():
    """data_prep/tokenize.py is a directory run through its __main__.py, so no script needs to
    take its own directory off sys.path to unshadow the standard library's tokenize."""
    assert (REPO / "data_prep" / "tokenize.py" / "__main__.py").is_file()
    for path in (p for p in (REPO / "data_prep").rglob("*.py") if p.is_file()):
        assert "sys.path" not in path.read_text(), path


def test_stdlib_tokenize_is_not_shadowed_when_scripts_run_by_path():
    import subprocess
    import sys

    for script in ("data_prep/tokenize.py", "data_prep/train_tokenizer.py"):
        code = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert code.returncode == 0, code.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "import sys, tokenize; print(tokenize.__file__)"],
                           cwd=REPO / "data_prep", capture_output=True, text=True, timeout=60)
    assert "data_prep" not in probe.stdout
