"""A new stage (or a new mix on resume) continues each source instead of re-reading it.

Issue 12, defect 2: in ``experiment=tiny_k2`` 544 of stage 2's 763 documents had been read in
stage 1, because every stage built a fresh blend in which every source started over. Here a
document counts as *read* by the sample holding its first token (each document has exactly one
such sample per epoch, whatever the packing), and a curriculum may read a document again only
when a source's multiplier asks for another epoch.
"""

from __future__ import annotations

import collections
import copy

import pytest

from orchestration.config import ConfigError, SourceConfig, StageConfig, validate
from orchestration.data.datasets import run_streams, stage_datasets
from orchestration.loop.stages import plan_stages


def _first_token_documents(epoch, index: int) -> list[int]:
    """Documents whose first token is in sample ``index`` of a Megatron GPTDataset."""
    row = int(epoch.shuffle_index[index])
    (begin, begin_offset), (end, end_offset) = epoch.sample_index[row], epoch.sample_index[row + 1]
    first = int(begin) if int(begin_offset) == 0 else int(begin) + 1
    last = int(end) if int(end_offset) > 0 else int(end) - 1
    return [int(d) for d in epoch.document_index[first:last + 1]]


def documents_read(train) -> dict[str, list[tuple[int, int]]]:
    """Per source: (epoch, document) of every document a stage's samples read."""
    out = collections.defaultdict(list)
    for part in train.parts:
        for local in range(part.segment.samples):
            piece, position = part.slice_of(local)
            epoch, index = piece.stream.locate(piece.offset + position)
            source = part.names[int(part.blend.dataset_index[local])]
            out[source] += [(epoch, d) for d in
                            _first_token_documents(piece.stream.epoch(epoch), index)]
    return out


def _k2_like(tiny_cfg, steps=(30, 8), second=(0.25, 4.0)):
    """tiny_k2 in miniature: stage 2 re-weights the same two sources of stage 1."""
    cfg = copy.deepcopy(tiny_cfg)
    one, two = copy.deepcopy(cfg.data), copy.deepcopy(cfg.data)
    one.sources[1].multiplier = 2.0
    two.sources[0].multiplier, two.sources[1].multiplier = second
    cfg.stages = [StageConfig(name="one", data=one, max_steps=steps[0]),
                  StageConfig(name="two", data=two, max_steps=steps[1])]
    return cfg


def _read(cfg, history=None):
    stages, streams = plan_stages(cfg), run_streams(cfg)
    return [stage_datasets(cfg, st, stages, streams, history).train for st in stages]


def test_stage_two_continues_every_source_of_stage_one(tiny_cfg, megatron_env):
    first, second = (documents_read(t) for t in _read(_k2_like(tiny_cfg)))
    for source in ("alpha", "beta"):
        assert len(set(first[source])) == len(first[source]), "no re-read within a stage"
        again = set(first[source]) & set(second[source])
        assert not again, f"{source}: stage 2 read {len(again)} documents stage 1 had read"
        assert {e for e, _ in first[source] + second[source]} == {0}, "one epoch is enough"


def test_stream_positions_continue_across_stages(tiny_cfg, megatron_env):
    one, two = _read(_k2_like(tiny_cfg))
    positions = collections.defaultdict(list)
    for train in (one, two):
        for source, position in train.sources(range(len(train))):
            positions[source].append(position)
    for source, seen in positions.items():
        assert sorted(seen) == list(range(len(seen))), f"{source}: each position once, in order"
    read_in_one = collections.Counter(s for s, _ in one.sources(range(len(one))))
    assert min(p for s, p in two.sources(range(len(two))) if s == "beta") == read_in_one["beta"]


def test_a_new_epoch_only_when_the_multiplier_asks_for_one(tiny_cfg, megatron_env):
    """Stage 2 draws more of beta than is left of its first epoch: the rest of epoch 0 comes
    first, then epoch 1, in which each document is read once."""
    cfg = _k2_like(tiny_cfg, steps=(30, 30), second=(0.05, 4.0))
    one, two = _read(cfg)
    first, second = documents_read(one), documents_read(two)
    stream = next(p.stream for p in two.parts[0].slices if p.stream.key.prefix.endswith("beta"
                                                                                          "_text_document"))
    reads = first["beta"] + second["beta"]
    assert stream.samples_per_epoch < len(two) and {e for e, _ in reads} == {0, 1}
    assert len(set(reads)) == len(reads), "within an epoch, each document once"
    every = {d for i in range(stream.samples_per_epoch)
             for d in _first_token_documents(stream.epoch(0), i)}
    assert {d for e, d in reads if e == 0} == every, \
        "epoch 1 starts only once every document of epoch 0 was read"
    assert len(every) >= stream.key.documents[1] - stream.key.documents[0] - 2  # a short tail


def test_mix_change_on_resume_continues_too(tiny_cfg, megatron_env):
    """A new `data` from step 11 on (recorded in data_history): the first 10 batches read as
    before, the rest continues each source after them."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.max_steps = 30
    (before,) = _read(cfg)
    changed = copy.deepcopy(cfg.data)
    changed.sources[0].multiplier = 3.0
    from orchestration.config import to_dict

    history = [{"stage": 0, "step": 1, "data": to_dict(cfg.data)},
               {"stage": 0, "step": 11, "data": to_dict(changed)}]
    (after,) = _read(cfg, history)
    gbs = cfg.train.global_batch_size
    assert [after[i]["tokens"].tolist() for i in range(10 * gbs)] == \
        [before[i]["tokens"].tolist() for i in range(10 * gbs)], "the past keeps its meaning"
    assert len(after.parts) == 2
    read = documents_read(after)
    for source in ("alpha", "beta"):
        assert len(set(read[source])) == len(read[source]), f"{source}: nothing read twice"
    positions = collections.defaultdict(list)
    for source, position in after.sources(range(len(after))):
        positions[source].append(position)
    assert all(sorted(p) == list(range(len(p))) for p in positions.values())


def test_subset_slices_are_disjoint_and_cover_the_source(tiny_cfg, megatron_env):
    """Crystal gave each phase its own slice of a source (data_subset 0.0-0.1, part0of2 and
    part1of2): two stages over [0, 0.5) and [0.5, 1) of the same files read disjoint documents
    that together are every training document."""
    cfg = copy.deepcopy(tiny_cfg)
    halves = []
    for subset in ([0.0, 0.5], [0.5, 1.0]):
        data = copy.deepcopy(cfg.data)
        data.sources = [SourceConfig(name=s.name, path=s.path, subset=subset)
                        for s in data.sources]
        halves.append(data)
    cfg.stages = [StageConfig(name=f"half{i}", data=d, max_steps=40)
                  for i, d in enumerate(halves)]
    one, two = _read(cfg)
    for source in ("alpha", "beta"):
        keys = [next(p.stream.key for p in t.parts[0].slices if p.stream.key.prefix.endswith(
            f"{source}_text_document")) for t in (one, two)]
        (a0, a1), (b0, b1) = keys[0].documents, keys[1].documents
        assert a0 == 0 and a1 == b0 and b1 == 392, "the halves partition the 392 train documents"
        first, second = documents_read(one)[source], documents_read(two)[source]
        assert all(a0 <= d < a1 for _, d in first) and all(b0 <= d < b1 for _, d in second)


@pytest.mark.parametrize("subset", [[0.5, 0.2], [-0.1, 0.5], [0.0, 1.5], [0.3]])
def test_bad_subset_is_a_one_line_error_naming_the_key(tiny_cfg, subset):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.data.sources[1].subset = subset
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value).splitlines()[-1]
    assert "data.sources[1] (beta).subset=" in message and "0 <= a < b <= 1" in message
