"""The two tokenizer kinds the data tools take: sentencepiece ``.model`` and HF ``tokenizer.json``.

LLaMA-3-style and K2-V2-style models ship a Hugging Face ``tokenizer.json`` (the ``tokenizers``
package) rather than a sentencepiece model. Both kinds get the same rules here: each document is
``encode(text) + [eos]`` with no BOS (``add_special_tokens=False``, as sentencepiece's plain
``encode``), the dtype follows the vocabulary size, and FIM needs the four FIM tokens in the
vocabulary. The kind is told from the file's content, not its name: a JSON object is a
``tokenizer.json``, anything else must parse as a sentencepiece model. A file that is neither
raises :class:`TokenizerError` with one line saying so (not ``could not parse ModelProto``).
"""

from __future__ import annotations

import os
from pathlib import Path

from data_prep.fim import FIM_PIECES, FimTokens

#: End-of-document tokens tried in order when ``--eos-token`` is not given: sentencepiece/LLaMA-2,
#: LLaMA-3 (``<|end_of_text|>``, its tokenizer.json), GPT-2/K2 style, Gemma.
HF_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")


class TokenizerError(ValueError):
    """The tokenizer file cannot be used (unparseable, or lacks a needed token)."""


class TextTokenizer:
    """``encode`` a batch of texts to id lists; ``encode_inner`` without a dummy-prefix space."""

    kind = ""
    vocab_size = 0
    eos_id = 0

    def __init__(self, path: str) -> None:
        self.path = str(path)

    def encode(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_inner(self, texts: list[str]) -> list[list[int]]:
        return self.encode(texts)

    def token_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def fim_tokens(self) -> FimTokens:
        """The FIM token ids, or a clear error if the vocabulary lacks them."""
        ids = []
        for piece in FIM_PIECES:
            i = self.token_id(piece)
            if i is None:
                raise TokenizerError(
                    f"tokenizer {self.path} has no {piece} token; train one with "
                    "`python data_prep/train_tokenizer.py --fim-tokens ...` to use --fim-rate"
                )
            ids.append(i)
        return FimTokens(*ids)


class SentencePieceTokenizer(TextTokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        super().__init__(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(
                f"{path}: not a sentencepiece model (sentencepiece cannot parse it) nor a "
                "Hugging Face tokenizer.json (not JSON); pass a .model or tokenizer.json"
            ) from e
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise TokenizerError(f"{path}: the sentencepiece model has no EOS id (</s>)")
        self._inner = None

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1) if texts else []

    def encode_inner(self, texts: list[str]) -> list[list[int]]:
        if self._inner is None:
            from data_prep.fim import no_dummy_prefix_processor

            self._inner = no_dummy_prefix_processor(self.path)
        return self._inner.encode(texts, num_threads=1) if texts else []

    def token_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() or self.sp.id_to_piece(i) != piece else i


class HFTokenizer(TextTokenizer):
    """A ``tokenizers`` ``tokenizer.json``; single-threaded (the pool gives the parallelism)."""

    kind = "huggingface"

    def __init__(self, path: str, eos_token: str | None = None) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer

        super().__init__(path)
        try:
            self.tok = Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(
                f"{path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:120]})"
            ) from e
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._eos(eos_token)

    def _eos(self, eos_token: str | None) -> int:
        wanted = (eos_token,) if eos_token else HF_EOS_CANDIDATES
        for piece in wanted:
            if (i := self.tok.token_to_id(piece)) is not None:
                return i
        raise TokenizerError(
            f"{self.path}: no end-of-document token among {', '.join(wanted)}; "
            "name it with --eos-token"
        )

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def token_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


def is_hf_tokenizer_file(path: str | Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")


def load_text_tokenizer(path: str | Path, eos_token: str | None = None) -> TextTokenizer:
    """The tokenizer in ``path``, by content; :class:`TokenizerError` if it is unusable."""
    path = str(path)
    if not Path(path).is_file():
        raise TokenizerError(f"--tokenizer-model: no such file: {path}")
    if is_hf_tokenizer_file(path):
        return HFTokenizer(path, eos_token)
    if eos_token:
        raise TokenizerError(f"--eos-token is for tokenizer.json files; {path} is sentencepiece")
    return SentencePieceTokenizer(path)
