"""Where the project lives: the one definition of the repository and ``conf/`` directories."""

from __future__ import annotations

from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_DIR / "conf"


def resolve_repo_path(path: str | Path) -> Path:
    """A path from a config as training saw it: absolute, or relative to the cwd or the repo."""
    for candidate in (Path(path), Path.cwd() / path, REPO_DIR / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path} not found (also tried relative to {REPO_DIR})")
