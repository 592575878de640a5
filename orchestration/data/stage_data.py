"""A stage's training samples, read through the run's per-source streams.

A stage read with one mix is one segment; a resumed run whose config gave the stage another mix
reads it in several (``data/history.py``). :class:`StageTrainData` puts the segments' blends
(``streams.py``) one after another, so the loop indexes a stage's samples as one dataset, and
says which source, stream and document each sample came from (the data sequence and the
skip log name them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from orchestration.data.streams import SegmentBlend, Stream


class StageTrainData:
    """A stage's training samples: its segments' blends one after another (batch-aligned).

    Sample ``i`` of the stage is in the segment holding the batch that holds it
    (``Stage.first_sample``: ``b * global_batch_size`` without a batch-size ramp);
    ``sources`` and ``documents`` say where a sample came from.
    """

    def __init__(self, stage, parts: list[SegmentBlend]) -> None:
        self.stage, self.parts = stage, parts
        self._starts = [stage.first_sample(p.segment.first_batch) for p in parts]

    def __len__(self) -> int:
        return self.stage.samples

    def _part(self, index: int) -> tuple[SegmentBlend, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"stage '{self.stage.name}' has {len(self)} samples, not {index}")
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[k], index - self._starts[k]

    def __getitem__(self, index: int) -> dict:
        part, local = self._part(index)
        return part.blend[local]

    def sources(self, indices) -> list[tuple[str, int]]:
        """(source, stream position) of each of the stage's sample ``indices``."""
        out = []
        for i in indices:
            part, local = self._part(int(i))
            out.append(part.source_of(local))
        return out

    def documents(self, index: int) -> list[int]:
        """Document ids (of its prefix) that the stage's sample ``index`` holds tokens of."""
        stream, position = self.stream_of(index)
        return stream.documents(position)

    def stream_of(self, index: int) -> tuple[Stream, int]:
        """The stream the stage's sample ``index`` comes from, and its position there."""
        part, local = self._part(index)
        piece, position = part.slice_of(local)
        return piece.stream, piece.offset + position

    def locate(self, index: int) -> tuple[object, int]:
        """(Megatron GPTDataset of the epoch, sample within it) of the stage's sample ``index``."""
        stream, position = self.stream_of(index)
        epoch, sample = stream.locate(position)
        return stream.epoch(epoch), sample

    @property
    def streams(self) -> list[Stream]:
        """The streams the stage reads (one per prefix of each mix it reads)."""
        return list({id(p.stream): p.stream for part in self.parts for p in part.slices}.values())
