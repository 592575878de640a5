"""The special-token ids Megatron's GPTDataset needs, read from the run's tokenizer."""

from __future__ import annotations

from pathlib import Path

from orchestration.config import ConfigError, DataConfig, ModelConfig


class TokenizerInfo:
    """Vocabulary size, end-of-document and pad ids of a sentencepiece model."""

    def __init__(self, model_path: str, vocab_size: int, eod: int, pad: int | None) -> None:
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.eod = eod
        self._pad = pad
        self.unique_identifiers = {"class": "SentencePiece", "path": model_path,
                                   "vocab_size": vocab_size}

    @property
    def pad(self) -> int:
        if self._pad is None:  # GPTDataset falls back to its own pad id on AttributeError
            raise AttributeError("tokenizer has no pad token")
        return self._pad

    @classmethod
    def from_sentencepiece(cls, model_path: str) -> TokenizerInfo:
        import sentencepiece as spm

        if not Path(model_path).is_file():
            raise FileNotFoundError(f"data.tokenizer_model: no sentencepiece model at {model_path}")
        sp = spm.SentencePieceProcessor(model_file=model_path)
        pad = sp.pad_id() if sp.pad_id() >= 0 else None
        return cls(model_path, sp.get_piece_size(), sp.eos_id(), pad)


def load_tokenizer(model: ModelConfig, data: DataConfig) -> TokenizerInfo:
    """The mix's tokenizer, checked against the model's vocabulary."""
    if not data.tokenizer_model:
        raise ConfigError(f"data.tokenizer_model is empty for data mix '{data.name}'")
    tokenizer = TokenizerInfo.from_sentencepiece(data.tokenizer_model)
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(
            f"tokenizer {data.tokenizer_model} has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size={model.vocab_size}; set model.vocab_size >= the tokenizer's")
    return tokenizer
