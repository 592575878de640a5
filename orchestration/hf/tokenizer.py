"""The run's sentencepiece tokenizer as Hugging Face tokenizer files.

Why a converter of our own: transformers' converters change behaviour and API between
releases; building ``tokenizer.json`` from the model proto keeps segmentation identical to the
sentencepiece model training used (``tests/test_export.py`` compares them).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from orchestration.common.files import write_json_atomic
from orchestration.common.paths import resolve_repo_path
from orchestration.config import RunConfig


def sentencepiece_to_tokenizers(model_file: Path):
    """A ``tokenizers.Tokenizer`` that segments exactly as the sentencepiece model does.

    Built from the model proto rather than with transformers' converters, whose behaviour and
    API change between releases: BPE (merges ranked by piece id) or Unigram, byte fallback,
    the normaliser's charsmap, whitespace collapsing and dummy prefix as the proto says.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if ts.model_type == 1:  # unigram
        model = Unigram(pieces, unk_id=ts.unk_id, byte_fallback=ts.byte_fallback)
    elif ts.model_type == 2:  # bpe
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        normal = [p.piece for p in proto.pieces if p.type == 1]
        model = BPE(
            vocab,
            _bpe_merges(normal, vocab),
            unk_token=ts.unk_piece,
            fuse_unk=True,
            byte_fallback=ts.byte_fallback,
        )
    else:
        raise ValueError(f"{model_file}: sentencepiece model_type {ts.model_type} unsupported")
    tok = Tokenizer(model)
    steps = [normalizers.Precompiled(ns.precompiled_charsmap)] if ns.precompiled_charsmap else []
    if ns.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " ")]
    if ts.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())  # one string, so Strip drops only the dummy prefix's space
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type == 3]
    )
    tok.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type == 4])
    return tok


def _bpe_merges(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, ranked by the merged piece's id (its score)."""
    merges = []
    for piece in sorted(pieces, key=vocab.__getitem__):
        splits = [
            (piece[:i], piece[i:])
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    return merges


def write_tokenizer(cfg: RunConfig, out: Path) -> dict[str, int]:
    """tokenizer.model, tokenizer.json and configs; return the special token ids."""
    import sentencepiece as spm

    model_file = resolve_repo_path(cfg.data.tokenizer_model)
    shutil.copyfile(model_file, out / "tokenizer.model")
    sentencepiece_to_tokenizers(model_file).save(str(out / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    ids = {k: v for k, v in ids.items() if v >= 0}
    tokens = {f"{k}_token": sp.id_to_piece(v) for k, v in ids.items()}
    write_json_atomic(out / "special_tokens_map.json", tokens)
    write_json_atomic(
        out / "tokenizer_config.json",
        {
            # Training data has no BOS (documents end in EOD), so neither do encoded prompts.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": cfg.model.seq_length,
            **tokens,
        },
    )
    return ids
