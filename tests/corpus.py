"""A small synthetic corpus for tests: a sentencepiece model plus indexed datasets.

Built without the data_prep pipeline (tested on its own) so training tests depend only on
Megatron's ``IndexedDatasetBuilder``. The text follows a few templates, so a model can learn it
and the loss falls well below the unigram entropy within a few dozen steps.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "one bird", "our team"]
_VERBS = ["sees", "likes", "finds", "brings", "wants", "paints"]
_OBJECTS = ["a red ball", "the green tree", "two apples", "the old house", "a small boat"]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if rng.random() < 0.3:
            out.append(f"{a} plus {b} equals {a + b}.")
        else:
            out.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}.")
    return out


def build_corpus(root: Path, vocab_size: int = 256, docs_per_source: int = 400) -> dict:
    """Write tokenizer.model and two sources; return {"tokenizer": path, "sources": {...}}."""
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root.mkdir(parents=True, exist_ok=True)
    text = sentences(3000, seed=0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(root / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    sources = {}
    for i, name in enumerate(("alpha", "beta")):
        prefix = root / f"{name}_text_document"
        builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
        for doc_id in range(docs_per_source):
            doc = " ".join(sentences(6, seed=1000 * (i + 1) + doc_id))
            builder.add_document(np.array(sp.encode(doc) + [sp.eos_id()]), [len(sp.encode(doc)) + 1])
        builder.finalize(str(prefix) + ".idx")
        sources[name] = str(prefix)
    return {"tokenizer": str(root / "tokenizer.model"), "sources": sources}
