"""Fill-in-the-middle (FIM) transforms for code documents, as in StarCoder / bigcode Megatron-LM.

A document is cut at two character positions drawn uniformly from ``[0, len(text)]`` into
prefix / middle / suffix, each piece is tokenized on its own, and the pieces are reassembled as

* PSM: ``<fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle``
* SPM: ``<fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle`` (variant 2 of the FIM
  paper, as in bigcode's ``permute`` and LLM360's ``starcoder_fim_main.py``).

The draws follow bigcode's order (apply FIM?, two boundaries, SPM?) from a generator seeded by
``(seed, file, line)``, so each document's transform depends only on the seed and its position:
re-runs are byte-identical whatever the worker count or block size.

Unlike bigcode (which re-tokenized pieces of 2048-token training samples on the fly), this runs
once at preprocessing time on whole documents. The middle and suffix are encoded *without*
sentencepiece's dummy-prefix space, so ``decode(prefix + middle + suffix)`` is the document:
a middle that starts inside a word does not get a spurious leading space.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIM_PIECES = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    middle: int
    suffix: int
    pad: int


@dataclass(frozen=True)
class FimPlan:
    """Where one document is cut, and in which order the pieces go."""

    prefix: str
    middle: str
    suffix: str
    spm: bool


def fim_tokens(sp, model_path: str = "") -> FimTokens:
    """The FIM control-token ids of a sentencepiece model, or a clear error if it lacks them."""
    ids = []
    for piece in FIM_PIECES:
        i = sp.piece_to_id(piece)
        if i == sp.unk_id() or sp.id_to_piece(i) != piece:
            raise ValueError(
                f"tokenizer {model_path or '(model)'} has no {piece} token; train one with "
                "`python data_prep/train_tokenizer.py --fim-tokens ...` to use --fim-rate"
            )
        ids.append(i)
    return FimTokens(*ids)


def document_rng(seed: int, file_index: int, line: int) -> random.Random:
    """A generator that depends only on the run seed and the document's file and line."""
    return random.Random(f"fim:{seed}:{file_index}:{line}")


def plan_fim(text: str, rng: random.Random, fim_rate: float, spm_rate: float) -> FimPlan | None:
    """Decide whether and where to cut ``text``; None leaves the document unchanged."""
    if rng.random() >= fim_rate:
        return None
    lo, hi = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    spm = rng.random() < spm_rate
    return FimPlan(text[:lo], text[lo:hi], text[hi:], spm)


def assemble(
    tokens: FimTokens, prefix: list[int], middle: list[int], suffix: list[int], spm: bool
) -> list[int]:
    """Token ids of a FIM document (without EOS)."""
    if spm:
        return [tokens.prefix, tokens.suffix, *suffix, tokens.middle, *prefix, *middle]
    return [tokens.prefix, *prefix, tokens.suffix, *suffix, tokens.middle, *middle]


def no_dummy_prefix_processor(model_path: str):
    """A second processor for the same model that does not prepend the dummy-prefix space.

    Needs protobuf (sentencepiece's model proto) to flip ``add_dummy_prefix``; used only by FIM.
    """
    import sentencepiece as spm

    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # pragma: no cover - protobuf ships with our dependencies
        raise RuntimeError("FIM needs the protobuf package (pip install protobuf)") from e
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
