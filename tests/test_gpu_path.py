"""The GPU path's Megatron configs, checked on CPU: what a GPU job of each experiment gives
Megatron (megatron_patches.explain), the CPU path, loud failure without Transformer Engine,
the keys' one-line validation, context-parallel groups over gloo and ``--explain``."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_patches import platform as plat
from megatron_patches.configs import build_megatron_configs
from megatron_patches.explain import explain, gpu_job_configs
from megatron_patches.parallel import tp_comm_overlap_args
from megatron_patches.platform import GPU_JOB, LayerSpecError
from orchestration.check import compose
from orchestration.config import ConfigError, validate
from orchestration.loop.manual_gc import manual_gc

REPO = Path(__file__).resolve().parents[1]
# The table (Megatron-LM defaults, Megatron-Bridge's Llama-3 recipes) for each model.
EXPERIMENTS = {"llama_1b": (1, 1, False), "crystal": (1, 1, False), "k2": (8, 4, True)}


@pytest.fixture(scope="module", params=list(EXPERIMENTS))
def gpu_job(request):
    cfg = compose([f"experiment={request.param}"])
    return request.param, cfg, gpu_job_configs(cfg)


def test_gpu_job_gets_megatrons_high_mfu_settings(gpu_job):
    name, cfg, mc = gpu_job
    tp, pp, tp_overlap = EXPERIMENTS[name]
    t, ddp, opt = mc.transformer, mc.ddp, mc.optimizer
    assert mc.layer_spec == "te" and mc.precision == "bf16" and t.params_dtype == torch.bfloat16
    assert (t.tensor_model_parallel_size, t.pipeline_model_parallel_size) == (tp, pp)
    assert t.apply_rope_fusion and t.gradient_accumulation_fusion
    assert t.cross_entropy_loss_fusion and t.cross_entropy_fusion_impl == "te"
    assert t.bias_activation_fusion and t.bias_dropout_fusion and t.masked_softmax_fusion
    assert t.recompute_granularity is None  # no recompute (Bridge 1B/3B/8B; K2 fits: plan)
    assert ddp.use_distributed_optimizer and ddp.overlap_grad_reduce and ddp.overlap_param_gather
    assert opt.overlap_param_gather and opt.use_distributed_optimizer
    # Megatron-LM turns align_param_gather on with the interleaved schedule only (K2: VP5).
    interleaved = cfg.parallel.virtual_pipeline > 1
    assert interleaved is (name == "k2")
    assert ddp.align_param_gather is interleaved
    if interleaved:
        assert t.virtual_pipeline_model_parallel_size == 5
        assert t.overlap_p2p_comm and not t.batch_p2p_comm
    assert t.tp_comm_overlap is tp_overlap and t.sequence_parallel is tp_overlap
    assert t.fp8 is None and t.context_parallel_size == 1 and not t.use_cpu_initialization
    assert cfg.runtime.manual_gc_interval == 100


def test_cpu_path_keeps_every_fusion_off():
    cfg = compose(["experiment=llama_1b", "model=tiny", "train.precision=auto"])
    mc = build_megatron_configs(cfg, on_cpu=True)
    t = mc.transformer
    assert mc.layer_spec == "local" and mc.precision == "fp32" and mc.on_cpu
    assert not (t.apply_rope_fusion or t.gradient_accumulation_fusion
                or t.cross_entropy_loss_fusion or t.bias_activation_fusion
                or t.masked_softmax_fusion or t.persist_layer_norm)
    assert not (mc.ddp.overlap_grad_reduce or mc.ddp.overlap_param_gather)
    assert mc.gpu_path.reasons["fusions.rope"] == "off (no CUDA (CPU run))"


@pytest.fixture
def cuda_without_te(monkeypatch):
    """A CUDA machine whose Transformer Engine fails to import, simulated at the probes."""
    monkeypatch.setattr(plat, "cuda_present", lambda: True)
    monkeypatch.setattr(plat, "transformer_engine_import_error",
                        lambda: "ImportError: libcudnn.so.9: cannot open shared object file")
    monkeypatch.setattr(plat, "fused_wgrad_available", lambda: True)


def test_cuda_without_transformer_engine_fails_naming_the_import_error(cuda_without_te):
    cfg = compose(["experiment=llama_1b"])
    with pytest.raises(LayerSpecError) as err:
        build_megatron_configs(cfg, on_cpu=False)
    message = str(err.value)
    assert "libcudnn.so.9" in message and "model.layer_spec=local" in message
    assert "\n" not in message


def test_cuda_without_te_runs_local_only_when_asked(cuda_without_te):
    cfg = compose(["experiment=llama_1b", "model.layer_spec=local"])
    mc = build_megatron_configs(cfg, on_cpu=False)
    assert mc.layer_spec == "local" and not mc.on_cpu
    assert not mc.transformer.apply_rope_fusion  # TE's fused RoPE is missing too
    assert not mc.transformer.cross_entropy_loss_fusion
    assert mc.transformer.gradient_accumulation_fusion  # apex is there
    with pytest.raises(ConfigError, match="fusions.rope=true but needs Transformer Engine"):
        build_megatron_configs(compose(["experiment=llama_1b", "model.layer_spec=local",
                                        "fusions.rope=true"]), on_cpu=False)


def test_explicit_te_spec_on_cpu_fails():
    with pytest.raises(LayerSpecError, match="model.layer_spec=te but"):
        build_megatron_configs(compose(["model.layer_spec=te"]), on_cpu=True)


def test_asking_for_a_fusion_the_cpu_lacks_is_one_line_error():
    with pytest.raises(ConfigError, match=r"^fusions.cross_entropy=true but no CUDA"):
        build_megatron_configs(compose(["fusions.cross_entropy=true"]), on_cpu=True)


@pytest.mark.parametrize("overrides, expected", [
    (["parallel.tp_comm_overlap=true", "parallel.tensor=2"],
     "parallel.tp_comm_overlap=true needs parallel.sequence_parallel=true"),
    (["parallel.context=2", "model.layer_spec=local"],
     "parallel.context > 1 needs Transformer Engine's attention"),
    (["parallel.context=3"], "sequence length(s) [128] are not divisible"),
    (["fp8.format=hybrid", "model.layer_spec=local"], "fp8.format=hybrid runs in Transformer"),
    (["fp8.param=true"], "fp8.param=true needs fp8.format"),
    (["fp8.format=e5m2"], "fp8.format='e5m2' is not one of"),
    (["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=false"],
     "parallel.overlap_param_gather=true needs parallel.distributed_optimizer"),
    (["runtime.manual_gc_interval=-1"], "runtime.manual_gc_interval=-1 must be >= 0"),
])
def test_gpu_keys_are_validated_with_one_line_errors(overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert expected in str(err.value)


def test_world_size_counts_context_parallel_ranks():
    cfg = compose(["parallel.context=2", "train.global_batch_size=16", "train.micro_batch_size=4"])
    validate(cfg, world_size=4)  # CP 2 x DP 2
    with pytest.raises(ConfigError, match="parallel.context = 2"):
        validate(cfg, world_size=3)


def test_fp8_context_parallel_and_tp_overlap_reach_megatron():
    cfg = compose(["experiment=k2", "fp8.format=hybrid", "fp8.recipe=tensorwise",
                   "fp8.param=true", "parallel.context=2", "parallel.cp_comm_type=a2a"])
    mc = gpu_job_configs(cfg)
    t = mc.transformer
    assert (t.fp8, t.fp8_recipe, t.fp8_amax_history_len, t.fp8_amax_compute_algo) == (
        "hybrid", "tensorwise", 1024, "max")
    assert t.fp8_param and mc.ddp.fp8_param_gather  # Megatron-LM's --fp8-param-gather
    assert (t.context_parallel_size, t.cp_comm_type) == (2, "a2a")
    args = tp_comm_overlap_args(cfg)  # TE's initialize_ub, as Megatron-LM calls it
    assert args["shape"] == [2048 * 4 // 2, 8192] and args["tp_size"] == 8
    assert args["use_fp8"] and args["bootstrap_backend"] == "nccl" and args["ub_cfgs"] == {}


def test_fp8_needs_te_on_a_cuda_machine(cuda_without_te):
    cfg = compose(["fp8.format=e4m3", "model.layer_spec=local"])
    with pytest.raises(ConfigError, match="need Transformer Engine"):
        build_megatron_configs(cfg, on_cpu=False, platform=plat.probe_platform(False))


def _context_parallel_rank(rank: int, world: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    from megatron_patches import cpu_compat
    from megatron_patches.parallel import (
        context_parallel_size,
        data_parallel_size,
        init_model_parallel,
        slice_for_context_parallel,
    )

    cpu_compat.enable(force=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    init_model_parallel(1, 1, 60, context=2)
    tokens = torch.arange(16).view(1, 16)
    part = slice_for_context_parallel({"tokens": tokens, "labels": tokens + 100})
    Path(f"{out}.{rank}").write_text(json.dumps({
        "cp": context_parallel_size(), "dp": data_parallel_size(),
        "tokens": part["tokens"].tolist(), "labels": part["labels"].tolist()}))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_context_parallel_groups_and_batch_split_on_gloo(tmp_path):
    import json

    import torch.multiprocessing as mp
    from dist import _free_port

    out = str(tmp_path / "cp")
    mp.start_processes(_context_parallel_rank, args=(2, _free_port(), out), nprocs=2,
                       join=True, start_method="spawn")
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert all(r["cp"] == 2 and r["dp"] == 1 for r in ranks)
    # Megatron's load balancing: 4 chunks of 4; rank 0 gets chunks 0 and 3, rank 1 1 and 2.
    assert ranks[0]["tokens"] == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert ranks[1]["tokens"] == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert ranks[1]["labels"] == [[104, 105, 106, 107, 108, 109, 110, 111]]


def test_explain_prints_what_megatron_receives(capsys):
    from orchestration.explain import main

    assert main(["experiment=k2"]) == 0
    text = capsys.readouterr().out
    for line in ("apply_rope_fusion = True", "gradient_accumulation_fusion = True",
                 "cross_entropy_fusion_impl = 'te'", "tp_comm_overlap = True",
                 "overlap_param_gather = True", "tensor_model_parallel_size = 8",
                 "self_attention.core_attention    TEDotProductAttention"):
        assert line in text
    assert "recompute_granularity" not in text
    assert "CUDA yes; Transformer Engine imports" in text


def test_explain_this_machine_shows_the_cpu_path(capsys):
    from orchestration.explain import main

    assert main(["--this-machine", "runtime.device=cpu"]) == 0
    text = capsys.readouterr().out
    assert "layer spec local" in text and "apply_rope_fusion" not in text
    assert "self_attention.core_attention    DotProductAttention" in text


def test_train_explain_flag_runs_without_a_gpu():
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "orchestration.train", "experiment=llama_1b",
                           "--explain"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run llama_1b: what Megatron-Core receives" in proc.stdout
    assert "num_layers = 22" in proc.stdout and "layer spec te" in proc.stdout


def test_explain_matches_the_gpu_job_builder():
    cfg = compose(["experiment=crystal"])
    text = explain(cfg, GPU_JOB)
    assert "rotary_percent" not in text  # a GPTModel argument, not a TransformerConfig field
    # Crystal's LayerNorm and biases are Megatron's defaults; the QKV bias is not.
    assert "add_qkv_bias = True" in text and "normalization" not in text


def test_manual_gc_collects_at_the_interval_and_restores_the_collector():
    assert gc.isenabled()
    collected = []
    with manual_gc(3) as collect:
        assert not gc.isenabled()
        gc.callbacks.append(lambda phase, info: collected.append(phase))
        try:
            for step in range(1, 8):
                collect(step)
        finally:
            gc.callbacks.pop()
    assert gc.isenabled()
    assert collected.count("start") == 2  # steps 3 and 6
    with manual_gc(0) as collect:
        assert gc.isenabled()


def test_cpu_tools_open_a_gpu_runs_checkpoint_config(megatron_env):
    """Export/averaging build a local-spec CPU model whatever kernels the run used."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from orchestration.hf.offline import build_cpu_model

    cfg = compose(["model.layer_spec=te", "fusions.rope=true", "fp8.format=hybrid",
                   "parallel.overlap_grad_reduce=true"])
    model = build_cpu_model(cfg, saved_tp=1)
    attention = model.decoder.layers[0].self_attention.core_attention
    assert isinstance(attention, DotProductAttention)
    assert model.config.fp8 is None and not model.config.apply_rope_fusion


CUDA_AND_TE = torch.cuda.is_available() and plat.transformer_engine_import_error() is None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_AND_TE, reason="needs CUDA and Transformer Engine")
def test_te_spec_names_printed_without_te_match_the_real_spec(megatron_env):
    from megatron_patches.llama_spec import TE_SPEC_MODULES, describe_spec, llama_layer_spec

    real = describe_spec(llama_layer_spec("te"))
    assert {k: v.split()[0] for k, v in TE_SPEC_MODULES.items()} == {
        k: real[k] for k in TE_SPEC_MODULES}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_copy_does_not_sync_and_reads_the_values():
    from orchestration.loop.host_copy import HostCopy

    copy = HostCopy(3, torch.float64, torch.device("cuda"))
    values = torch.tensor([1.5, 2.0, 0.0], dtype=torch.float64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        copy.start(values * 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert copy.values() == [3.0, 4.0, 0.0]
