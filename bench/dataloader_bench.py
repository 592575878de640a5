"""Data path: samples/s delivered vs needed, and the blended-index build time at K2 scale.

``python bench/dataloader_bench.py throughput [--seq-length 2048] [--global-batch-size 16]
[--dp 1] [--step-time-s 0.3]`` reads the demo mix (``conf/data/demo.yaml``) three ways, in
alternating blocks over the same samples: the driver's path (``orchestration.data.batches.microbatches``
over the blended ``GPTDataset``: blend lookup, shuffle, multi-document samples, labels, masks,
collation), ``GPTDataset.__getitem__`` alone (isolates the driver's own share), and the same
token spans straight from ``IndexedDataset.get``, concatenated and stacked (the floor). It
prints what one process delivers against what a step needs: global batch / dp / step time.

``python bench/dataloader_bench.py index [--scales 0.003 0.01 0.03 0.1]`` times
``BlendedMegatronDatasetBuilder.build()`` (via the driver's ``setup.stage_datasets``) for the
K2 stage-1 mix (``conf/data/k2_stage1.yaml``: 14 sources, ~1.3T tokens; a stage of 1.4T tokens
at seq 2048) described by fake ``.idx`` files only: document sizes written with Megatron's
``_IndexWriter``, ``.bin`` files sparse and never written. The full size needs ~1.25e9
documents (~25 GB of .idx) and tens of GB of index arrays, more than this machine has, so it
runs at reduced scales, each in a fresh process (first builds, then builders that load
Megatron's ``path_to_cache``), fits time and memory linearly and extrapolates to scale 1.

``python bench/dataloader_bench.py held-out [--scale 0.01]`` times the per-source held-out
sets (``train.eval_per_source``) as ``build_datasets`` made them before the fix (sizes
``[1, valid, 0]``: a one-epoch train index per source that nobody reads) against the fix that
``build_datasets`` now applies (only the validation range of the split), and checks both hold
out the same samples.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    REPO,
    compose_config,
    linear_fit,
    paired_ratios,
    print_header,
    run_alternating,
    summarize,
    timed,
)
from megatron_patches.parallel import single_process_group  # noqa: E402
from orchestration.data.batches import BatchLayout, microbatches  # noqa: E402
from orchestration.data.datasets import build_datasets  # noqa: E402


def demo_train_dataset(seq: int, samples: int, cache: Path):
    """The demo mix's blended train dataset, built as the driver builds a stage's data."""
    from orchestration.data.tokenizer import load_tokenizer

    cfg = compose_config(["data=demo", f"model.seq_length={seq}"])
    tokenizer = load_tokenizer(cfg.model, cfg.data)
    return build_datasets(
        cfg.data, tokenizer, seq, seed=1234, train_samples=samples, valid_samples=1, cache_dir=cache
    ).train


def sample_spans(blended, index: int) -> tuple[object, list[tuple[int, int, int]]]:
    """(IndexedDataset, [(document, offset, length)]) that sample ``index`` is made of,
    resolved with the dataset's own indices as ``GPTDataset`` does, but without reading."""
    gpt, sample = blended.locate(index)  # the source's epoch (GPTDataset) and its sample
    if gpt.shuffle_index is None:
        gpt[0]  # loads the lazily memory-mapped indices
    i = gpt.shuffle_index[sample]
    (beg, beg_off), (end, end_off) = gpt.sample_index[i], gpt.sample_index[i + 1]
    extra = gpt.config.add_extra_token_to_sequence
    lengths = gpt.dataset.sequence_lengths
    spans = []
    for k in range(int(beg), int(end) + 1):
        doc = int(gpt.document_index[k])
        off = int(beg_off) if k == beg else 0
        stop = int(end_off) + extra if k == end else int(lengths[doc])
        spans.append((doc, off, stop - off))
    return gpt.dataset, spans


def read_raw(batches: list[list[tuple[object, list]]]) -> None:
    """The floor: the same token spans straight from IndexedDataset, one array per batch."""
    for batch in batches:
        rows = [
            np.concatenate([ds.get(d, offset=o, length=n) for d, o, n in spans])
            for ds, spans in batch
        ]
        torch.from_numpy(np.stack(rows).astype(np.int64))


def throughput(a: argparse.Namespace) -> None:
    single_process_group()
    layout = BatchLayout(a.micro_batch_size, a.global_batch_size, 1, 0)
    steps = a.steps_per_block
    with tempfile.TemporaryDirectory() as cache:
        ds = demo_train_dataset(a.seq_length, a.reps * steps * a.global_batch_size, Path(cache))
        n = len(ds)

        def spans(step: int) -> list:
            return [
                [sample_spans(ds, int(i) % n) for i in row] for row in layout.sample_indices(step)
            ]

        plan = {rep: [spans(rep * steps + s) for s in range(steps)] for rep in range(a.reps)}
        for rep in range(a.reps):  # warm the page cache and the lazy index loads
            read_raw([b for step in plan[rep] for b in step])

        def driver(rep: int) -> float:
            return timed(
                lambda: [list(microbatches(ds, layout, rep * steps + s)) for s in range(steps)]
            )

        def samples_only(rep: int) -> float:  # GPTDataset.__getitem__ without our collation
            rows = [row for s in range(steps) for row in layout.sample_indices(rep * steps + s)]
            return timed(lambda: [[ds[int(i) % n] for i in row] for row in rows])

        def raw(rep: int) -> float:
            return timed(lambda: [read_raw(step) for step in plan[rep]])

        blocks = {"driver": driver, "dataset": samples_only, "raw": raw}
        times = run_alternating(blocks, a.reps)
    report_throughput(a, times, steps * a.global_batch_size)


def report_throughput(a: argparse.Namespace, times: dict, samples: int) -> None:
    rates = {k: [samples / t for t in v] for k, v in times.items()}
    print(
        f"\nseq {a.seq_length}, micro-batch {a.micro_batch_size}, global batch "
        f"{a.global_batch_size}; {a.reps} alternating blocks of {samples} samples each"
    )
    for name, values in rates.items():
        print(
            f"{name:>7}: {summarize(values).fmt(unit=' samples/s')}  "
            f"({summarize(values).median * a.seq_length:,.0f} tokens/s)"
        )
    for other in ("dataset", "raw"):
        ratio = summarize(paired_ratios(rates["driver"], rates[other]))
        print(f"driver/{other} throughput (paired): {ratio.fmt()}")
    per_sample = summarize([(d - g) / samples * 1e6 for d, g in
                            zip(times["driver"], times["dataset"], strict=True)])  # fmt: skip
    print(f"driver's own cost (microbatches + collate) per sample: {per_sample.fmt(unit=' us')}")
    needed = a.global_batch_size / a.dp / a.step_time_s
    have = summarize(rates["driver"]).median
    print(
        f"needed per rank: {a.global_batch_size} / dp {a.dp} / {a.step_time_s} s = "
        f"{needed:,.1f} samples/s; delivered by one process: {have:,.0f} samples/s "
        f"({have / needed:,.1f}x, reading uses {needed / have:.2%} of the step)"
    )


# Mean tokens per document (assumed: the K2 card publishes token counts only). They set the
# document count, which the document index and the .idx size scale with.
K2_MEAN_DOC_TOKENS = {
    "dm-math": 300, "pubmed-abstracts": 300, "uspto": 4000, "pubmed-central": 8000,
    "redpajama.arxiv": 12000, "starcoder.spm": 1500, "starcoder.fim": 1500, "starcoder": 1500,
    "redpajama.stackexchange": 700, "pile-of-law": 3000, "redpajama.book": 100000,
    "s2orc": 6000, "redpajama.wikipedia": 800, "refinedweb": 700,
}  # fmt: skip
K2_STAGE_TOKENS, K2_SEQ, K2_GBS = 1.4e12, 2048, 2040


def fake_document_sizes(tokens: int, mean_doc: int, rng: np.random.Generator) -> np.ndarray:
    """Log-normal document sizes summing to exactly ``tokens`` (each at least one token)."""
    n = max(1, round(tokens / mean_doc))
    raw = rng.lognormal(0.0, 1.0, n)
    sizes = np.maximum(1, np.floor(raw / raw.sum() * tokens)).astype(np.int64)
    sizes[np.argmax(sizes)] += tokens - int(sizes.sum())
    return sizes


def write_fake_source(prefix: str, sizes: np.ndarray) -> None:
    """A Megatron ``.idx`` for ``sizes`` (one sequence per document) and a sparse ``.bin``."""
    from megatron_patches.datasets import indexed_dataset_module

    class VectorIndexWriter(indexed_dataset_module()._IndexWriter):
        def _sequence_pointers(self, lengths):  # upstream's is a Python loop per document
            return np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64) * 2])

    with VectorIndexWriter(prefix + ".idx", np.uint16) as writer:
        writer.write(sizes.astype(np.int32), None, np.arange(len(sizes) + 1, dtype=np.int64))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(sizes.sum()) * 2)  # uint16 tokens; a hole, no data written


def k2_run_config(root: str, scale: float, per_source: bool = True, threads: int = 0):
    """A run on the K2 stage-1 mix with a single stage of ``scale`` x 1.4T tokens; the demo
    tokenizer stands in for K2's (the dataset needs only its end-of-document id). ``threads``
    overrides the mix's ``data.builder_threads`` (0: as the mix sets it)."""
    import os

    os.environ["K2_DATA"] = root
    steps = math.ceil(K2_STAGE_TOKENS * scale / (K2_GBS * K2_SEQ))
    return compose_config([
        "data=k2_stage1", "model=k2_65b", f"run_dir={root}", f"train.max_steps={steps}",
        f"train.global_batch_size={K2_GBS}", f"train.eval_per_source={per_source}",
        f"data.tokenizer_model={REPO / 'data' / 'demo' / 'tokenizer.model'}",
        *([f"data.builder_threads={threads}"] if threads else []),
    ])  # fmt: skip


def write_fake_k2(root: str, scale: float) -> dict:
    rng, docs, tokens = np.random.default_rng(0), 0, 0
    for src in k2_run_config(root, scale).data.sources:
        sizes = fake_document_sizes(round(src.tokens * scale), K2_MEAN_DOC_TOKENS[src.name], rng)
        write_fake_source(src.path, sizes)
        docs, tokens = docs + len(sizes), tokens + int(sizes.sum())
    return {"documents": docs, "tokens": tokens}


def run_scale(scale: float, root: str, reps: int, per_source: bool, threads: int = 0) -> dict:
    """In a fresh process: ``reps`` first builds (cache removed before each), then ``reps``
    loads from Megatron's cache, of the scaled K2 stage's data, through the driver's own
    ``orchestration.data.datasets.stage_datasets`` (blend, per-source held-out sets, cache dir)."""
    import resource
    import shutil
    import statistics

    from orchestration.data.datasets import stage_datasets
    from orchestration.loop.stages import plan_stages

    single_process_group()
    cfg = k2_run_config(root, scale, per_source, threads)
    stage, cache = plan_stages(cfg)[0], Path(root) / "data_cache"

    def build() -> None:
        stage_datasets(cfg, stage)

    first = []
    for _ in range(reps):
        shutil.rmtree(cache, ignore_errors=True)
        first.append(timed(build))
    cached = [timed(build) for _ in range(reps)]
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    return {
        "scale": scale,
        "train_samples": stage.steps * stage.global_batch_size,
        "first_s": statistics.median(first),
        "cached_s": statistics.median(cached),
        "first_all": first,
        "cached_all": cached,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "cache_gb": size / 1e9,
    }


def index_build(a: argparse.Namespace) -> None:
    rows = []
    for scale in a.scales:
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            written = write_fake_k2(root, scale)
            write_s = time.perf_counter() - t0
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "_one-scale",
                    str(scale),
                    root,
                    str(a.reps),
                    str(a.per_source),
                    str(a.builder_threads),
                ],
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]) | written | {"write_s": write_s})
        r = rows[-1]
        print(
            f"scale {scale:g}: {r['tokens']:.3g} tokens in {r['documents']:,} docs; "
            f"stage {r['train_samples']:,} samples: fake .idx written in {r['write_s']:.1f} s; "
            f"first build {r['first_s']:.2f} s, cached load {r['cached_s']:.3f} s "
            f"(medians of {a.reps}); "
            f"peak RSS {r['peak_rss_gb']:.2f} GB; cache {r['cache_gb']:.3f} GB"
        )
    print(
        "\nlinear fit y = a + b * scale over the medians, extrapolated to scale 1 "
        "(the full K2 stage):"
    )
    for key in ("first_s", "cached_s", "peak_rss_gb", "cache_gb"):
        fit_a, fit_b = linear_fit([r["scale"] for r in rows], [r[key] for r in rows])
        print(f"   {key:<12} a={fit_a:8.3f} b={fit_b:10.3f}  -> {fit_a + fit_b:10.1f} at scale 1")


def held_out_sets(cfg, stage, cache: Path, skip_train: bool) -> dict:
    """Per-source held-out sets as ``build_datasets(per_source=True)`` built them before the
    fix (sizes ``[1, valid, 0]``, so each source also gets a one-epoch train index) or, with
    ``skip_train``, as it builds them now (the train split left out of the split matrix)."""
    from dataclasses import replace

    from megatron_patches.datasets import GPTDatasetConfig, build_split
    from orchestration.data.datasets import blend_of
    from orchestration.data.tokenizer import load_tokenizer

    config = GPTDatasetConfig(  # as orchestration.data.datasets.build_datasets makes it
        random_seed=cfg.train.seed, sequence_length=stage.seq_length, blend=blend_of(stage.data),
        split=stage.data.split, path_to_cache=str(cache), tokenizer=load_tokenizer(cfg.model, stage.data),
        reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=stage.data.eod_mask_loss, create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )  # fmt: skip
    valid, sets = max(cfg.train.eval_iters, 1) * stage.global_batch_size, {}
    for source in stage.data.sources:
        single = replace(config, blend=([source.path], None))
        if skip_train:  # same documents held out: only the valid range of the matrix is kept
            single.split_matrix = [None, single.split_matrix[1], None]
        sizes = [0 if skip_train else 1, valid, 0]
        _, sets[source.name], _ = build_split(single, sizes)
    return sets


def held_out(a: argparse.Namespace) -> None:
    """Time the per-source held-out builds, before vs after the fix, alternating; same samples?"""
    import shutil

    from orchestration.loop.stages import plan_stages

    single_process_group()
    with tempfile.TemporaryDirectory() as root:
        write_fake_k2(root, a.scale)
        cfg = k2_run_config(root, a.scale)
        stage, cache = plan_stages(cfg)[0], Path(root) / "held_out_cache"

        def variant(skip_train: bool):
            def run(_rep: int) -> float:
                shutil.rmtree(cache, ignore_errors=True)
                return timed(lambda: held_out_sets(cfg, stage, cache, skip_train))

            return run

        times = run_alternating({"before": variant(False), "fix": variant(True)}, a.reps)
        now, fix = (held_out_sets(cfg, stage, cache, flag) for flag in (False, True))
        same = all(np.array_equal(now[k][i]["tokens"], fix[k][i]["tokens"])
                   for k in now for i in (0, len(now[k]) // 2, len(now[k]) - 1))  # fmt: skip
    print(f"\nK2 scale {a.scale:g}: per-source held-out sets of 14 sources, first build")
    for name, values in times.items():
        print(f"   {name:<7} {summarize(values).fmt(unit=' s')}")
    ratio = summarize(paired_ratios(times["fix"], times["before"]))
    print(f"   fix/before (paired) {ratio.fmt()}; identical held-out samples: {same}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--seq-length", type=int, default=2048)
    t.add_argument("--micro-batch-size", type=int, default=4)
    t.add_argument("--global-batch-size", type=int, default=16)
    t.add_argument("--dp", type=int, default=1, help="data-parallel size (per-rank need)")
    t.add_argument("--step-time-s", type=float, default=0.3)
    t.add_argument("--reps", type=int, default=10)
    t.add_argument("--steps-per-block", type=int, default=4)
    i = sub.add_parser("index")
    i.add_argument("--scales", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    i.add_argument("--reps", type=int, default=3, help="builds and cached loads per scale")
    i.add_argument(
        "--no-per-source",
        dest="per_source",
        action="store_false",
        help="train.eval_per_source=false: no per-source held-out sets",
    )
    i.add_argument("--builder-threads", type=int, default=0,
                   help="data.builder_threads (default: the mix's, 8 for k2_stage1)")
    h = sub.add_parser("held-out")
    h.add_argument("--scale", type=float, default=0.01)
    h.add_argument("--reps", type=int, default=4)
    o = sub.add_parser("_one-scale")  # internal: one scale in a fresh process, JSON out
    o.add_argument("scale", type=float)
    o.add_argument("root")
    o.add_argument("reps", type=int)
    o.add_argument("per_source", choices=("True", "False"))
    o.add_argument("threads", type=int)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.cmd == "_one-scale":
        print(json.dumps(run_scale(a.scale, a.root, a.reps, a.per_source == "True", a.threads)))
        return 0
    print_header(f"data loader: {a.cmd}", "python bench/dataloader_bench.py " + " ".join(argv))
    {"throughput": throughput, "index": index_build, "held-out": held_out}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
