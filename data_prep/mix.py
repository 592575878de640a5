"""Data mixes: blend weights from token counts x multipliers, as LLM360 publishes them.

A mix (``conf/data/*.yaml``) lists sources with a ``multiplier`` = epochs of that source per
stage. A source's effective tokens are ``tokens x multiplier`` and its blend weight is its share
of the total, which is what Megatron's ``BlendedMegatronDatasetConfig.blend`` takes. Token
counts come from the source's ``.idx`` when it exists (exact, and cheap: only the index is read)
and otherwise from the published ``tokens`` value, so a mix can be inspected before the data is
downloaded. ``python -m data_prep.mix conf/data/k2_stage1.yaml --stage-tokens 1.3T`` prints it.

A source may be many shards (``path`` a glob, or ``paths`` a list): its tokens are the sum over
its prefixes, its blend weight is as for one prefix, and Megatron's blend gets each prefix as
its own dataset with the source's weight split by the prefixes' token counts, so each shard is
drawn in proportion to its size, exactly as if the shards were one merged prefix.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


@dataclass
class SourceShare:
    name: str
    path: str
    tokens: int  # tokens in one pass over the source
    multiplier: float  # passes (epochs) per stage
    effective_tokens: float  # tokens the stage draws from this source
    share: float  # blend weight, sums to 1 over the mix
    prefixes: list[str] = field(default_factory=list)  # its datasets (one unless sharded)
    prefix_tokens: list[int] = field(default_factory=list)  # tokens of each prefix
    subset: list[float] | None = None  # the slice [a, b) of its documents it reads

    def prefix_weights(self) -> list[float]:
        """Each prefix's part of this source, by its tokens (equal parts if none counted)."""
        total = sum(self.prefix_tokens)
        if not total:
            return [1 / len(self.prefixes)] * len(self.prefixes)
        return [t / total for t in self.prefix_tokens]

    def epochs(self, stage_tokens: float) -> float:
        """Passes over this source when the whole stage trains on ``stage_tokens``."""
        return self.share * stage_tokens / self.tokens if self.tokens else 0.0


def count_tokens(prefix: str, subset: list[float] | None = None) -> int:
    """Tokens in a Megatron dataset, from its ``.idx`` alone (no ``.bin`` read or needed);
    with ``subset: [a, b]`` those of its documents ``[round(a n), round(b n))``."""
    from megatron_patches.datasets import count_tokens as _count
    from megatron_patches.datasets import document_count

    if subset is None:
        return _count(prefix)
    n = document_count(prefix)
    return _count(prefix, (int(round(subset[0] * n)), int(round(subset[1] * n))))


def check_subset(src) -> list[float] | None:
    """A source's ``subset`` as ``[a, b]`` with ``0 <= a < b <= 1`` (a one-line error if not)."""
    subset = _get(src, "subset")
    if subset is None:
        return None
    values = [float(v) for v in subset]
    if len(values) != 2 or not 0.0 <= values[0] < values[1] <= 1.0:
        raise ValueError(f"source '{_get(src, 'name', '?')}': subset={values}: expected [a, b] "
                         "with 0 <= a < b <= 1")
    return values


def _get(src, key: str, default=None):
    """A source's field, from a ``SourceConfig`` or a plain dict."""
    value = src.get(key, default) if isinstance(src, dict) else getattr(src, key, default)
    return default if value is None else value


def source_prefixes(src) -> list[str]:
    """The prefixes of a source: ``path`` and ``paths``, globs expanded over ``.idx`` files
    (sorted). A glob that matches nothing gives nothing (see :func:`_source_tokens`)."""
    patterns = [p for p in [str(_get(src, "path", ""))] + list(_get(src, "paths", []) or []) if p]
    out: list[str] = []
    for pattern in patterns:
        pattern = str(pattern).removesuffix(".idx")
        if glob.has_magic(pattern):
            out += sorted(f[: -len(".idx")] for f in glob.glob(pattern + ".idx"))
        else:
            out.append(pattern)
    return list(dict.fromkeys(out))


def _source_tokens(src) -> tuple[int, list[str], list[int]]:
    """(tokens, prefixes, tokens per prefix): counted from the ``.idx`` files when they all
    exist, else the published ``tokens`` (before the data is downloaded)."""
    prefixes, subset = source_prefixes(src), check_subset(src)
    if prefixes and all(Path(p + ".idx").is_file() for p in prefixes):
        counts = [count_tokens(p, subset) for p in prefixes]
        return sum(counts), prefixes, counts
    if _get(src, "tokens") is not None:
        fraction = subset[1] - subset[0] if subset else 1.0
        return int(int(_get(src, "tokens")) * fraction), prefixes, []
    shown = [p for p in prefixes if not Path(p + ".idx").is_file()][:3] or [
        str(p) for p in [_get(src, "path", "")] + list(_get(src, "paths", []) or []) if p]
    what = f"no index at {shown[0]}.idx" if prefixes else f"{', '.join(shown)} matches no .idx"
    raise ValueError(
        f"source '{_get(src, 'name', '?')}': {what} and no `tokens` given; "
        "tokenize it (data_prep/tokenize.py) or set its published token count"
    )


def compute_mix(sources: list, stage_tokens: int | None = None) -> list[SourceShare]:
    """Shares of each source; with ``stage_tokens``, effective tokens for that stage size.

    Without ``stage_tokens`` a source's effective tokens are ``tokens x multiplier`` (the stage
    the mix describes); with it they are ``share x stage_tokens``. ``sources`` are
    ``SourceConfig`` objects or dicts with the same keys.
    """
    if not sources:
        raise ValueError("the mix has no sources")
    rows = []
    for src in sources:
        mult = float(_get(src, "multiplier", 1.0))
        if mult < 0:
            raise ValueError(f"source '{_get(src, 'name', '?')}': multiplier {mult} is negative")
        tokens, prefixes, counts = _source_tokens(src)
        rows.append((src, tokens, mult, tokens * mult, prefixes, counts))
    total = sum(r[3] for r in rows)
    if total <= 0:
        raise ValueError("the mix has no tokens (every source is empty or has multiplier 0)")
    return [
        SourceShare(
            name=str(_get(src, "name", "")),
            path=str(_get(src, "path", "")),
            tokens=tokens,
            multiplier=mult,
            share=eff / total,
            effective_tokens=eff if stage_tokens is None else eff / total * stage_tokens,
            prefixes=prefixes or [str(_get(src, "path", ""))],
            prefix_tokens=counts,
            subset=check_subset(src),
        )
        for src, tokens, mult, eff, prefixes, counts in rows
    ]


def blend_for_megatron(shares: list[SourceShare]) -> tuple[list[str], list[float]]:
    """``(prefixes, weights)`` for ``BlendedMegatronDatasetConfig.blend``; weights sum to 1.

    A sharded source contributes each shard, its share split by the shards' token counts."""
    total = sum(s.share for s in shares)
    prefixes, weights = [], []
    for s in shares:
        prefixes += s.prefixes
        weights += [s.share / total * w for w in s.prefix_weights()]
    return prefixes, weights


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def parse_tokens(text: str) -> int:
    """``1.3T`` / ``69.4B`` / ``5e9`` / ``1000`` -> an integer token count."""
    text = text.strip().upper()
    if text and text[-1] in _SUFFIXES:
        return int(float(text[:-1]) * _SUFFIXES[text[-1]])
    return int(float(text))


def format_table(shares: list[SourceShare], stage_tokens: int | None = None) -> str:
    """Name, tokens, multiplier, share and epochs seen for a stage of ``stage_tokens``."""
    stage = stage_tokens or sum(s.tokens * s.multiplier for s in shares)
    width = max([len(s.name) for s in shares] + [6])
    head = (
        f"{'source':<{width}}  {'tokens':>9}  {'mult':>5}  {'share':>7}  {'stage tok':>9}  epochs"
    )
    lines = [head, "-" * len(head)]
    for s in shares:
        lines.append(
            f"{s.name:<{width}}  {human(s.tokens):>9}  {s.multiplier:>5.2f}  "
            f"{100 * s.share:>6.2f}%  {human(s.share * stage):>9}  {s.epochs(stage):6.2f}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<{width}}  {human(sum(s.tokens for s in shares)):>9}  {'':>5}  "
        f"{100 * sum(s.share for s in shares):>6.2f}%  {human(stage):>9}"
    )
    return "\n".join(lines)


def load_mix(path: str | Path) -> dict:
    """A mix YAML, checked against the ``DataConfig`` schema training reads (unknown keys and
    wrong types fail naming the file), as a plain dict with ``${oc.env:...}`` resolved."""
    from orchestration.config import load_data_mix, to_dict

    return to_dict(load_data_mix(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.mix",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="a data mix YAML, e.g. conf/data/k2_stage1.yaml")
    p.add_argument("--stage-tokens", type=parse_tokens, help="stage budget, e.g. 1.3T or 69.4B")
    p.add_argument("--json", action="store_true", help="print the shares as JSON")
    a = p.parse_args(argv)
    try:
        mix = load_mix(a.config)
        shares = compute_mix(mix["sources"], a.stage_tokens)
    except (OSError, ValueError) as e:
        print(f"error: {a.config}: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps([asdict(s) for s in shares], indent=1))
    else:
        print(f"mix {mix['name'] or a.config} (split {mix['split']})")
        print(format_table(shares, a.stage_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
