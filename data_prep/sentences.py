"""Sentence splitting for ``--split-sentences``: NLTK Punkt, never downloaded.

Punkt is unsupervised, so by default it is trained on the first few MB of the input itself;
that adapts it to the corpus (abbreviations, collocations) and needs no network. A model can
also be loaded from a local file:

* ``*.json``: parameters saved by this module (``--punkt-save``),
* ``*.pickle`` / ``*.pkl``: a legacy NLTK Punkt pickle, loaded with NLTK's allowlisted
  unpickler (only Punkt classes can be reconstructed),
* a directory in NLTK's ``punkt_tab`` layout (``abbrev_types.txt``, ``collocations.tab``,
  ``sent_starters.txt``, ``ortho_context.tab``), e.g. ``.../punkt_tab/english``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer, PunktTrainer

from orchestration.common.files import write_json_atomic


def train_punkt(texts: Iterable[str]) -> PunktParameters:
    """Learn Punkt parameters from raw documents (one pass, streamed)."""
    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    for text in texts:
        trainer.train(text, finalize=False)
    trainer.finalize_training()
    return trainer.get_params()


def save_punkt(params: PunktParameters, path: str | Path) -> None:
    """Write parameters as sorted JSON (diffable, and safe to load unlike a pickle)."""
    data = {
        "abbrev_types": sorted(params.abbrev_types),
        "collocations": sorted([list(c) for c in params.collocations]),
        "sent_starters": sorted(params.sent_starters),
        "ortho_context": dict(sorted(params.ortho_context.items())),
    }
    write_json_atomic(path, data, indent=1, sort_keys=False)


def _from_dict(data: dict) -> PunktParameters:
    params = PunktParameters()
    params.abbrev_types = set(data["abbrev_types"])
    params.collocations = {tuple(c) for c in data["collocations"]}
    params.sent_starters = set(data["sent_starters"])
    params.ortho_context = defaultdict(int, {k: int(v) for k, v in data["ortho_context"].items()})
    return params


def _tab_lines(path: Path) -> list[str]:
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line]


def _from_punkt_tab(lang_dir: Path) -> PunktParameters:
    params = PunktParameters()
    params.abbrev_types = set(_tab_lines(lang_dir / "abbrev_types.txt"))
    params.collocations = {tuple(x.split("\t")) for x in _tab_lines(lang_dir / "collocations.tab")}
    params.sent_starters = set(_tab_lines(lang_dir / "sent_starters.txt"))
    ortho = (x.split("\t") for x in _tab_lines(lang_dir / "ortho_context.tab"))
    params.ortho_context = defaultdict(int, {k: int(v) for k, v in ortho})
    return params


def _from_pickle(path: Path) -> PunktParameters:
    from nltk.tokenize.punkt import punkt_pickle_load

    with open(path, "rb") as f:
        obj = punkt_pickle_load(f)
    params = getattr(obj, "_params", obj)
    if not isinstance(params, PunktParameters):
        raise ValueError(f"{path}: pickle holds {type(obj).__name__}, not a Punkt model")
    return params


def load_punkt(path: str | Path) -> PunktParameters:
    """Punkt parameters from a local JSON file, legacy pickle or punkt_tab directory."""
    path = Path(path)
    try:
        if path.is_dir():
            return _from_punkt_tab(path)
        if path.suffix in (".pickle", ".pkl"):
            return _from_pickle(path)
        return _from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(
            f"cannot load Punkt parameters from {path} ({e}); expected a JSON file from "
            "--punkt-save, an NLTK Punkt pickle, or a punkt_tab language directory"
        ) from e


def make_splitter(params: PunktParameters) -> PunktSentenceTokenizer:
    return PunktSentenceTokenizer(params)
