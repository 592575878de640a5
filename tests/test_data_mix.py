"""Data mixes (data_prep.mix) and the conf/data/*.yaml files."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from test_data_common import REPO, make_docs, tiny_tokenizer, write_jsonl

from data_prep.mix import (
    blend_for_megatron,
    compute_mix,
    count_tokens,
    format_table,
    load_mix,
    main,
    parse_tokens,
)
from data_prep.pipeline import TokenizeOptions
from data_prep.tokenize_cli import run_tokenize

CONF = REPO / "conf" / "data"

# The LLM360 K2 stage-1 table as published: name -> (starting tokens in B, multiplier,
# total tokens in B, % of total).
K2_STAGE1 = {
    "dm-math": (4.33, 3, 13.0, 1.0),
    "pubmed-abstracts": (4.77, 3, 14.3, 1.1),
    "uspto": (4.77, 3, 14.3, 1.1),
    "pubmed-central": (26, 1, 26, 2.0),
    "redpajama.arxiv": (27.3, 1, 27.3, 2.1),
    "starcoder.spm": (67.6, 0.5, 33.8, 2.6),
    "starcoder.fim": (67.6, 0.5, 33.8, 2.6),
    "redpajama.stackexchange": (61.1, 1, 61.1, 4.7),
    "starcoder": (132.6, 0.5, 66.3, 5.1),
    "pile-of-law": (76.7, 1, 76.7, 5.9),
    "redpajama.book": (80.6, 1, 80.6, 6.2),
    "s2orc": (107.9, 1, 107.9, 8.3),
    "redpajama.wikipedia": (22.1, 6, 132.6, 10.2),
    "refinedweb": (612.3, 1, 612.3, 47.1),
}


def test_k2_stage1_reproduces_the_published_table():
    mix = load_mix(CONF / "k2_stage1.yaml")
    shares = compute_mix(mix["sources"])
    assert [s.name for s in shares] == list(K2_STAGE1)
    for s in shares:
        tokens_b, mult, total_b, pct = K2_STAGE1[s.name]
        assert s.tokens == pytest.approx(tokens_b * 1e9) and s.multiplier == mult
        assert s.effective_tokens / 1e9 == pytest.approx(total_b, abs=0.05)
        assert 100 * s.share == pytest.approx(pct, abs=0.05), s.name
    assert sum(s.effective_tokens for s in shares) == pytest.approx(1.3e12, rel=1e-3)
    paths, weights = blend_for_megatron(shares)
    assert sum(weights) == pytest.approx(1.0, abs=1e-12) and len(paths) == 14
    assert paths[0].endswith("/dm-math_text_document")


def test_k2_stage2_rows_match_the_card():
    shares = compute_mix(load_mix(CONF / "k2_stage2.yaml")["sources"])
    by = {s.name: s for s in shares}
    assert by["python"].effective_tokens == 20.5e9 and by["open-web-math"].tokens == 14.6e9
    assert by["algebraic-stack"].tokens == 10.9e9
    assert 60e9 < sum(s.effective_tokens for s in shares) <= 69.4e9


def test_stage_tokens_and_epochs():
    sources = [
        {"name": "a", "path": "/nope/a", "tokens": 100, "multiplier": 3},
        {"name": "b", "path": "/nope/b", "tokens": 700, "multiplier": 1},
    ]
    shares = compute_mix(sources, stage_tokens=2000)
    assert [s.share for s in shares] == [0.3, 0.7]
    assert [s.effective_tokens for s in shares] == [600, 1400]
    assert [s.epochs(2000) for s in shares] == [6, 2]
    table = format_table(shares, 2000)
    assert "a" in table and "6.00" in table and "30.00%" in table
    assert parse_tokens("1.3T") == 1_300_000_000_000 and parse_tokens("69.4B") == 69_400_000_000


def test_index_counts_win_over_published_tokens(tmp_path):
    opts = TokenizeOptions(tokenizer_model=tiny_tokenizer(), workers=0, progress=False)
    (s,) = run_tokenize(
        [write_jsonl(tmp_path / "a.jsonl", make_docs(30))], str(tmp_path / "a"), opts
    )
    prefix = s["output_prefix"]
    assert count_tokens(prefix) == s["tokens"]
    (tmp_path / "a_text_document.bin").unlink()  # the .idx alone is enough
    assert count_tokens(prefix) == s["tokens"]
    shares = compute_mix(
        [
            {"name": "a", "path": prefix, "tokens": 10**12, "multiplier": 2},
            {"name": "b", "path": "/nope/b", "tokens": s["tokens"]},
        ]
    )
    assert shares[0].tokens == s["tokens"] and shares[0].share == pytest.approx(2 / 3)


def test_missing_source_is_a_clear_error():
    with pytest.raises(ValueError, match=r"source 'web': no index at /data/web\.idx"):
        compute_mix([{"name": "web", "path": "/data/web", "tokens": None, "multiplier": 1}])
    with pytest.raises(ValueError, match="no sources"):
        compute_mix([])


@pytest.mark.parametrize("name", ["demo", "k2_stage1", "k2_stage2"])
def test_mix_yaml_fits_the_data_config_schema(name, monkeypatch):
    from orchestration.config import DataConfig

    monkeypatch.setenv("OPT_DATA_DIR", "/scratch")
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    data = OmegaConf.to_object(cfg)
    assert data.name == name and data.sources and "???" not in OmegaConf.to_yaml(cfg)
    assert [int(x) for x in data.split.split(",")] and sum(map(int, data.split.split(","))) == 100
    if name == "demo":
        assert data.tokenizer_model == "/scratch/demo/tokenizer.model"
        assert [s.path for s in data.sources] == [
            f"/scratch/demo/{s}_text_document" for s in ("prose", "code", "math")
        ]


def test_cli_prints_the_table(capsys):
    assert main([str(CONF / "k2_stage1.yaml"), "--stage-tokens", "1.3T"]) == 0
    out = capsys.readouterr().out
    assert "refinedweb" in out and "47.10%" in out and "6.00" in out
    assert main(["/no/such.yaml"]) == 2


def test_every_mix_composes_as_the_hydra_data_group():
    from hydra import compose, initialize_config_dir

    from orchestration.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for yaml_file in sorted(CONF.glob("*.yaml")):
            cfg = compose(config_name="config", overrides=[f"data={yaml_file.stem}"])
            assert cfg.data.name == yaml_file.stem and len(cfg.data.sources) >= 1


def _sharded_source(tmp_path, n_docs: int = 120) -> tuple[list[str], str]:
    """Two shards of one corpus (data_prep/tokenize.py --shard) and the same corpus unsharded."""
    from data_prep.shards import Shard

    opts = TokenizeOptions(tokenizer_model=tiny_tokenizer(), workers=0, progress=False)
    for i in range(4):
        write_jsonl(tmp_path / "in" / f"p{i}.jsonl", make_docs(n_docs // 4, seed=20 + i))
    shards = [run_tokenize([tmp_path / "in"], str(tmp_path / "web"), opts, shard=Shard(i, 2))[0]
              for i in (1, 2)]
    (whole,) = run_tokenize([tmp_path / "in"], str(tmp_path / "whole"), opts)
    return [s["output_prefix"] for s in shards], whole["output_prefix"]


def test_a_source_of_many_shards_sums_them_and_keeps_its_weight(tmp_path):
    shards, whole = _sharded_source(tmp_path)
    other = {"name": "b", "path": "/nope/b", "tokens": 1000, "multiplier": 2}
    merged = compute_mix([{"name": "web", "path": whole, "multiplier": 1.5}, other])
    globbed = compute_mix([{"name": "web", "path": str(tmp_path / "web_text_document-shard-*"),
                            "multiplier": 1.5}, other])
    listed = compute_mix([{"name": "web", "paths": shards, "multiplier": 1.5}, other])
    for mix in (globbed, listed):
        assert mix[0].name == "web" and mix[0].prefixes == shards
        assert mix[0].tokens == merged[0].tokens == sum(count_tokens(p) for p in shards)
        assert mix[0].share == pytest.approx(merged[0].share) and mix[0].multiplier == 1.5
    prefixes, weights = blend_for_megatron(globbed)
    assert prefixes == [*shards, "/nope/b"] and sum(weights) == pytest.approx(1.0)
    assert weights[0] + weights[1] == pytest.approx(merged[0].share)
    assert weights[0] / weights[1] == pytest.approx(count_tokens(shards[0]) / count_tokens(shards[1]))
    with pytest.raises(ValueError, match=r"source 'x': .*nothing-\* matches no \.idx"):
        compute_mix([{"name": "x", "path": str(tmp_path / "nothing-*")}])


def test_sharded_source_trains_and_has_one_held_out_set(tmp_path, megatron_env):
    from orchestration.config import DataConfig, SourceConfig
    from orchestration.data.datasets import build_datasets, check_sources_exist
    from orchestration.data.tokenizer import TokenizerInfo

    shards, whole = _sharded_source(tmp_path, n_docs=400)
    data = DataConfig(name="t", split="80,20,0", sources=[
        SourceConfig(name="web", path=str(tmp_path / "web_text_document-shard-*")),
        SourceConfig(name="whole", path=whole)])
    check_sources_exist(data)
    built = build_datasets(data, TokenizerInfo.from_sentencepiece(tiny_tokenizer()), 32, 1,
                           train_samples=64, valid_samples=16, cache_dir=tmp_path / "cache",
                           per_source=True)
    assert {s.key.prefix for s in built.train.streams} == {*shards, whole}
    held = built.valid_per_source["web"]
    assert {d.dataset_path for d in held.datasets} == set(shards) and len(held) >= 16
    assert set(built.valid_per_source) == {"web", "whole"}
    data.sources[0].path = str(tmp_path / "gone-*")
    with pytest.raises(FileNotFoundError, match=r"sources\[0\] \(web\): .*gone-\* matches no"):
        check_sources_exist(data)
