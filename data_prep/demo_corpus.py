"""A small three-source corpus built offline from what every Python install carries.

* ``prose``: the Python reference topics shipped with ``pydoc`` (``pydoc_data.topics``) and the
  docstrings of standard-library modules, classes and functions, one document per module.
  Docstrings are read with ``ast`` rather than by importing modules: importing the whole
  stdlib is slow and has side effects (``antigravity`` opens a browser, ``this`` prints).
* ``code``: standard-library ``.py`` files (tests, codec tables and generated data excluded),
  one document per file, files over ``MAX_CODE_DOC`` split at top-level statements.
* ``math``: seeded arithmetic word problems with worked answers (``demo_math``).

Everything is sorted and seeded, so one Python installation always yields the same bytes.
``scale`` shrinks or grows the byte budgets (tests use a few percent of the default).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import random
import sysconfig
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from data_prep.demo_math import math_documents
from orchestration.common.files import write_json_atomic

SOURCES = ("prose", "code", "math")
PROSE_BYTES = 3_000_000
CODE_BYTES = 4_000_000
MATH_PROBLEMS = 6_000
MAX_CODE_DOC = 32_000
_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "site-packages",
    "dist-packages",
    "encodings",
    "pydoc_data",
    "lib2to3",
    "turtledemo",
}


def stdlib_files() -> list[Path]:
    """The standard library's own ``.py`` files, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(sysconfig.get_paths()["stdlib"]).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) for the module and its classes and functions."""
    stack: list[tuple[str, ast.AST]] = [("", tree)]
    while stack:
        prefix, node = stack.pop(0)
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) > 40:
            yield prefix, doc
        for child in getattr(node, "body", []):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and (
                not child.name.startswith("_")
            ):
                stack.append((f"{prefix}.{child.name}".lstrip("."), child))


def _module_docs(files: list[Path]) -> Iterator[str]:
    for path in files:
        if (src := _read(path)) is None:
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        module = _module_name(path)
        parts = [
            f"{module}.{q}\n{d}" if q else f"Module {module}\n\n{d}" for q, d in _docstrings(tree)
        ]
        if parts:
            yield "\n\n".join(parts)


def prose_documents(files: list[Path], budget: int) -> Iterator[str]:
    """Reference topics first, then per-module docstrings, until ``budget`` characters."""
    from pydoc_data.topics import topics

    topic_docs = (f"{name}\n\n{inspect.cleandoc(topics[name])}" for name in sorted(topics))
    used = 0
    for text in chain(topic_docs, _module_docs(files)):
        if used >= budget:
            return
        used += len(text)
        yield text


def _statement_lines(tree: ast.Module) -> list[int]:
    """0-based first line of each top-level statement (decorators included)."""
    return [
        min([n.lineno, *(d.lineno for d in getattr(n, "decorator_list", []))]) - 1
        for n in tree.body
    ]


def _split_code(src: str) -> list[str]:
    """Pieces of at most ~``MAX_CODE_DOC`` characters, cut between top-level statements."""
    if len(src) <= MAX_CODE_DOC:
        return [src]
    try:
        starts = _statement_lines(ast.parse(src))
    except SyntaxError:
        return [src[i : i + MAX_CODE_DOC] for i in range(0, len(src), MAX_CODE_DOC)]
    lines = src.splitlines(keepends=True)
    bounds = sorted({0, *starts[1:], len(lines)})
    pieces, current = [], ""
    for a, b in zip(bounds, bounds[1:], strict=False):
        segment = "".join(lines[a:b])
        if current and len(current) + len(segment) > MAX_CODE_DOC:
            pieces.append(current)
            current = ""
        current += segment
    pieces.append(current)
    return [p for p in pieces if p.strip()]


def code_documents(files: list[Path], budget: int, seed: int) -> Iterator[str]:
    order = list(files)
    random.Random(seed).shuffle(order)  # a spread of packages, not the alphabet's first ones
    used = 0
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in order:
        if used >= budget:
            return
        src = _read(path)
        if not src or not src.strip():
            continue
        header = f"# {path.relative_to(root).as_posix()}\n"
        for piece in _split_code(src):
            used += len(piece)
            yield header + piece


def _write_jsonl(path: Path, source: str, docs: Iterator[str]) -> dict:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    h, n, size = hashlib.sha256(), 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            line = (
                json.dumps(
                    {"id": f"{source}-{i:06d}", "source": source, "text": text}, ensure_ascii=False
                )
                + "\n"
            )
            f.write(line)
            h.update(line.encode("utf-8"))
            n, size = n + 1, size + len(line.encode("utf-8"))
    os.replace(tmp, path)
    return {"path": path.name, "documents": n, "bytes": size, "sha256": h.hexdigest()}


def build_demo_corpus(out_dir: Path, seed: int = 0, scale: float = 1.0) -> dict:
    """Write ``out_dir/{prose,code,math}.jsonl``; return the manifest (also written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    generators = {
        "prose": prose_documents(files, int(PROSE_BYTES * scale)),
        "code": code_documents(files, int(CODE_BYTES * scale), seed),
        "math": math_documents(max(int(MATH_PROBLEMS * scale), 1), seed),
    }
    manifest = {"seed": seed, "scale": scale, "sources": {}}
    for name, docs in generators.items():
        manifest["sources"][name] = _write_jsonl(out_dir / f"{name}.jsonl", name, docs)
    write_json_atomic(out_dir / "manifest.json", manifest, indent=1, sort_keys=False)
    return manifest
