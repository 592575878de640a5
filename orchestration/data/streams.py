"""Each source is read as one stream over the whole run: a stage continues where the last stopped.

Why: Megatron's ``BlendedMegatronDatasetBuilder`` builds every blend's per-source GPTDatasets
from scratch, so a curriculum that built one blend per stage read every source from its start
again in every stage (issue 12: in ``experiment=tiny_k2`` 544 of stage 2's 763 documents had
been read in stage 1). Here the order of each source is fixed once for the run:

- A **stream** is one prefix's training documents (the split's train range, sliced by the
  source's ``subset``) at one sequence length, read epoch after epoch. Epoch ``e`` is
  Megatron's GPTDataset over those documents with ``num_samples=None`` (each document once,
  packed into samples), documents and samples shuffled with seed ``train.seed + e``. Stream
  position ``p`` is sample ``p mod L`` of epoch ``p // L`` (``L`` samples per epoch), so a new
  epoch starts only when the previous one is used up, which is when a source's multiplier asks
  for more than one pass, and the first positions of a stream never depend on how far it is read.
- A **segment** is a stretch of a stage read with one mix: the whole stage, or its parts before
  and after a mix change on resume (``data_history``). Its blend is Megatron's BlendedDataset
  (greedy and prefix-stable) over a *slice* of each of its streams that starts at the stream's
  **offset**: the samples the earlier segments drew from that stream (the counts of their
  blending indices). Offsets are a function of the config and the history of mix changes, never
  of what a job happened to read, so resume, rollback, replay and ``orchestration.data_sequence``
  all see the same samples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_patches.datasets import (
    GPTDatasetConfig,
    build_blend,
    build_epoch,
    document_count,
    train_documents,
)
from orchestration.config import DataConfig, to_dict
from orchestration.data.tokenizer import TokenizerInfo

log = logging.getLogger(__name__)


def gpt_config(data: DataConfig, tokenizer: TokenizerInfo, seq_length: int, seed: int,
               cache_dir: Path, blend=None) -> GPTDatasetConfig:
    """The Megatron dataset config of ``data`` at ``seq_length`` (indices cached in
    ``cache_dir``); ``blend`` defaults to the mix's (without one Megatron would mock data)."""
    if blend is None:
        from orchestration.data.datasets import blend_of

        blend = blend_of(data)
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, split=data.split,
        path_to_cache=str(cache_dir), tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=False, mid_level_dataset_surplus=0.005,
        num_dataset_builder_threads=data.builder_threads)


def data_fingerprint(data: DataConfig) -> str:
    """What decides the samples a mix reads (not its name or prepare hook)."""
    plain = to_dict(data)
    keep = ("tokenizer_model", "split", "sources", "eod_mask_loss")
    return json.dumps({k: plain[k] for k in keep}, sort_keys=True)


@dataclass(frozen=True)
class StreamKey:
    """What a stream's order depends on; two mixes sharing a key share the reading position."""

    prefix: str
    documents: tuple[int, int]  # [begin, end) of the prefix's documents
    seq_length: int


class Stream:
    """One prefix's training samples as an endless sequence of seeded epochs."""

    def __init__(self, key: StreamKey, num_documents: int, config: GPTDatasetConfig,
                 seed: int) -> None:
        self.key, self.num_documents, self.config, self.seed = key, num_documents, config, seed
        self._epochs: dict[int, object] = {}

    def epoch(self, number: int):
        """Megatron's GPTDataset of epoch ``number`` (built, or loaded from the cache)."""
        if number not in self._epochs:
            self._epochs[number] = build_epoch(self.config, self.key.prefix, self.key.documents,
                                               self.num_documents, self.seed + number)
        return self._epochs[number]

    @property
    def samples_per_epoch(self) -> int:
        size = len(self.epoch(0))
        if size <= 0:
            raise ValueError(f"{self.key.prefix}: documents {list(self.key.documents)} hold fewer "
                             f"than seq_length+1={self.key.seq_length + 1} tokens: no sample")
        return size

    def prepare(self, start: int, stop: int) -> None:
        """Build every epoch positions ``[start, stop)`` touch. Building is collective (rank 0
        first, then a barrier), so every rank calls this at the same point, never lazily."""
        if stop > start:
            per = self.samples_per_epoch
            for number in range(start // per, (stop - 1) // per + 1):
                self.epoch(number)

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, sample within the epoch) of stream ``position``."""
        return divmod(position, self.samples_per_epoch)

    def __getitem__(self, position: int) -> dict:
        number, index = self.locate(position)
        return self.epoch(number)[index]

    def documents(self, position: int) -> list[int]:
        """Document ids (of the prefix) that stream ``position`` holds tokens of."""
        number, index = self.locate(position)
        ds = self.epoch(number)
        row = int(ds.shuffle_index[index])
        begin, end = int(ds.sample_index[row][0]), int(ds.sample_index[row + 1][0])
        return [int(d) for d in ds.document_index[begin:end + 1]]

    @property
    def identifiers(self) -> dict:
        return {"prefix": self.key.prefix, "documents": list(self.key.documents),
                "seq_length": self.key.seq_length, "seed": self.seed}


class StreamSlice:
    """Stream positions ``[offset, offset + length)`` as one dataset of a Megatron blend."""

    def __init__(self, stream: Stream, offset: int, length: int) -> None:
        self.stream, self.offset, self.length = stream, offset, length
        self.index_split = stream.epoch(0).index_split
        self.unique_identifiers = {"class": "StreamSlice", **stream.identifiers,
                                   "offset": offset, "length": length}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.stream[self.offset + index]


@dataclass
class Segment:
    """Batches ``[first_batch, first_batch + batches)`` of ``stage``, read with ``data``."""

    stage: object  # orchestration.loop.stages.Stage
    first_batch: int
    batches: int
    data: DataConfig

    @property
    def samples(self) -> int:
        """The segment's samples (fewer than batches x gbs where a batch-size ramp is on)."""
        first = self.stage.first_sample
        return first(self.first_batch + self.batches) - first(self.first_batch)

    @property
    def first_step(self) -> int:
        return self.stage.step_of_batch(self.first_batch)


@dataclass
class SegmentBlend:
    """A segment's blend, the stream slices it reads and what it consumed of each stream."""

    segment: Segment
    blend: object  # Megatron BlendedDataset over ``slices``
    slices: list[StreamSlice]
    names: list[str]  # source name of each slice ("web#2": shard 2 of a sharded source)
    counts: list[int] = field(default_factory=list)  # samples drawn from each slice

    def source_of(self, index: int) -> tuple[str, int]:
        """(source, stream position) of the segment's sample ``index``."""
        j = int(self.blend.dataset_index[index])
        return self.names[j], self.slices[j].offset + int(self.blend.dataset_sample_index[index])

    def slice_of(self, index: int) -> tuple[StreamSlice, int]:
        j = int(self.blend.dataset_index[index])
        return self.slices[j], int(self.blend.dataset_sample_index[index])


def plan_segments(stages: list, history: list[dict]) -> list[Segment]:
    """The run's segments in order: per stage, its config data, split where ``history`` (entries
    ``{"stage", "step", "data"}``, the data read from ``step`` on) records another mix."""
    from orchestration.config.loading import to_data_config

    segments = []
    for stage in stages:
        entries = sorted((e for e in history if e["stage"] == stage.index),
                         key=lambda e: e["step"])
        starts = [(stage.first_step, stage.data)]
        for entry in entries:
            data = to_data_config(entry["data"])
            if entry["step"] == starts[-1][0]:
                starts[-1] = (entry["step"], data)
            elif data_fingerprint(data) != data_fingerprint(starts[-1][1]):
                starts.append((entry["step"], data))
        ends = [s for s, _ in starts[1:]] + [stage.last_step + 1]
        for (step, data), end in zip(starts, ends, strict=True):
            segments.append(Segment(stage, stage.batch_index(step), end - step, data))
    return segments


class RunStreams:
    """A run's streams and the blends of its segments, each built once, in run order.

    ``tokenizer_of(data)`` gives a mix's tokenizer; ``seed`` is ``train.seed`` (every epoch of
    every stream derives its order from it); indices go to ``cache_dir``.
    """

    def __init__(self, seed: int, cache_dir: Path, tokenizer_of) -> None:
        self.seed, self.cache_dir, self.tokenizer_of = seed, Path(cache_dir), tokenizer_of
        self._streams: dict[tuple, Stream] = {}
        self._documents: dict[str, int] = {}
        self._blends: dict[str, SegmentBlend] = {}
        self._warned: set[tuple[StreamKey, int]] = set()

    def blends(self, segments: list[Segment], upto: int) -> list[SegmentBlend]:
        """The blends of ``segments[:upto + 1]``; each segment's slices start where the earlier
        segments stopped reading the same stream."""
        consumed: dict[StreamKey, int] = {}
        out = []
        for segment in segments[:upto + 1]:
            blend = self._blend(segment, consumed)
            for piece, count in zip(blend.slices, blend.counts, strict=True):
                consumed[piece.stream.key] = consumed.get(piece.stream.key, 0) + count
            out.append(blend)
        return out

    def _blend(self, segment: Segment, consumed: dict[StreamKey, int]) -> SegmentBlend:
        from orchestration.data.datasets import source_shares

        data, stage = segment.data, segment.stage
        tokenizer = self.tokenizer_of(data)
        config = gpt_config(data, tokenizer, stage.seq_length, self.seed, self.cache_dir)
        slices, names, weights = [], [], []
        for share in source_shares(data):
            for k, (prefix, part) in enumerate(zip(share.prefixes, share.prefix_weights(),
                                                   strict=True)):
                weight = share.share * part
                if weight <= 0:
                    continue
                stream = self._stream(prefix, share.subset, stage.seq_length, config)
                if any(s.stream.key == stream.key for s in slices):
                    raise ValueError(f"data '{data.name}': source '{share.name}' reads the same "
                                     f"documents of {prefix} as another source of the mix")
                if (stream.key, segment.first_step) not in self._warned:
                    self._warned.add((stream.key, segment.first_step))
                    _warn_if_rereading(stream.key, consumed, segment)
                slices.append(StreamSlice(stream, consumed.get(stream.key, 0), segment.samples))
                names.append(share.name if len(share.prefixes) == 1 else f"{share.name}#{k}")
                weights.append(weight)
        key = json.dumps([s.unique_identifiers for s in slices] + [weights, segment.samples])
        if key not in self._blends:
            blend = build_blend(slices, weights, segment.samples, config)
            counts = _counts(blend.dataset_index, len(slices))
            for piece, count in zip(slices, counts, strict=True):
                piece.stream.prepare(piece.offset, piece.offset + count)
            self._blends[key] = SegmentBlend(segment, blend, slices, names, counts)
        cached = self._blends[key]
        return SegmentBlend(segment, cached.blend, cached.slices, cached.names, cached.counts)

    def _stream(self, prefix: str, subset: list[float] | None, seq_length: int,
                config: GPTDatasetConfig) -> Stream:
        if prefix not in self._documents:
            self._documents[prefix] = document_count(prefix)
        n = self._documents[prefix]
        begin, end = train_documents(config, n)
        if subset is not None:
            width = end - begin
            begin, end = begin + int(round(subset[0] * width)), begin + int(round(subset[1] * width))
        if end <= begin:
            raise ValueError(f"{prefix}: split '{config.split}' with subset {subset} leaves no "
                             "training documents")
        key = StreamKey(prefix, (begin, end), seq_length)
        cache_key = (key, config.eod_mask_loss, config.tokenizer.model_path)
        if cache_key not in self._streams:
            self._streams[cache_key] = Stream(key, n, config, self.seed)
        return self._streams[cache_key]


def _warn_if_rereading(key: StreamKey, consumed: dict[StreamKey, int], segment: Segment) -> None:
    """A stream that overlaps one already read (another ``seq_length``, an overlapping
    ``subset``) starts at its beginning, so it reads some documents again: say so."""
    for other, count in consumed.items():
        overlap = min(key.documents[1], other.documents[1]) > max(key.documents[0],
                                                                  other.documents[0])
        if other != key and other.prefix == key.prefix and overlap and count > 0:
            log.warning("stage '%s' reads %s (documents %s, seq_length %d) from its start: earlier "
                        "segments read %d samples of an overlapping stream (documents %s, "
                        "seq_length %d), whose documents it reads again", segment.stage.name,
                        key.prefix, list(key.documents), key.seq_length, count,
                        list(other.documents), other.seq_length)


def _counts(dataset_index, size: int, chunk: int = 1 << 26) -> list[int]:
    """Samples drawn from each of ``size`` datasets (a bincount in bounded memory)."""
    total = np.zeros(size, dtype=np.int64)
    for start in range(0, len(dataset_index), chunk):
        total += np.bincount(np.asarray(dataset_index[start:start + chunk]), minlength=size)
    return [int(c) for c in total]
