"""Quiet by default: the commands filter the known-harmless warnings and keep the others.

A short 2-rank training run through launch/local.sh (so with launch/common.sh's environment)
and an export print no warning line at all; they printed ~9 per rank and 16 before
(TE/Apex fallbacks, cuda_graph_scope, torch's renamed collectives, TORCH_NCCL_TRACE_BUFFER_SIZE).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import REPO, cli_experiment

from orchestration.common.quiet import KNOWN_HARMLESS, install_warning_filters

WARNING_LINE = re.compile(r"Warning|warnings\.warn\(|\[W\d{4} ")
SAMPLES = [  # a message of each kind, as megatron-core 0.16 / torch 2.13 word it
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to Torch "
     "optimizers."),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope to capture the whole "
     "layer."),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
     "`torch.distributed.all_gather_single` instead."),
    (FutureWarning, "`load_state_dict` is deprecated and will be removed in future versions. "
     "Please use `load` instead."),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor."),
]


def test_known_warnings_are_filtered_and_others_kept():
    assert all(k.why for k in KNOWN_HARMLESS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        install_warning_filters()
        for category, message in SAMPLES:
            warnings.warn(message, category, stacklevel=1)
        warnings.warn("Transformer Engine is broken", UserWarning, stacklevel=1)
        warnings.warn("`load_state_dict` is deprecated", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Transformer Engine is broken",
                                                "`load_state_dict` is deprecated"]


def test_commands_import_megatron_only_after_installing_the_filters():
    """Megatron's fallback notices fire when it is imported, so a command that filters them in
    main() must not import megatron at module level."""
    modules = {p.stem: p.read_text() for p in sorted((REPO / "orchestration").glob("*.py"))}
    commands = [name for name, text in modules.items() if 'if __name__ == "__main__"' in text]
    assert {"train", "export", "evaluate", "prompts", "gallery", "data_sequence"} <= set(commands)
    unfiltered = [name for name in commands if "install_warning_filters()" not in modules[name]]
    assert unfiltered == [], "these commands print Megatron's known-harmless notices"
    # One interpreter: after each command, forget every project and megatron module, so the
    # next command's imports run afresh (torch stays loaded: it is not what is checked).
    probe = ("import importlib, sys\n"
             "for name in sys.argv[1:]:\n"
             "    importlib.import_module('orchestration.' + name)\n"
             "    if 'megatron' in sys.modules: print(name)\n"
             "    for mod in [m for m in sys.modules if m.split('.')[0] in\n"
             "                ('megatron', 'megatron_patches', 'orchestration')]:\n"
             "        del sys.modules[mod]\n")
    out = subprocess.run([sys.executable, "-c", probe, *commands], cwd=REPO, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [], "these commands import megatron on import"


@pytest.mark.slow  # a 2-rank torchrun training run and an export: ~40 s on 2 cores
@pytest.mark.distributed
def test_training_and_export_print_no_warning_lines(corpus, tmp_path):
    cli_experiment(tmp_path / "conf", "quiet", corpus,
                   train={"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 4,
                          "eval_interval": 2, "log_interval": 1},
                   checkpoint={"save_interval": 4})
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_")}
    env.update(NPROC="2", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHON=sys.executable,
               TORCHRUN=f"{sys.executable} -m torch.distributed.run")
    train = subprocess.run(
        ["bash", "launch/local.sh", "--config-dir", str(tmp_path / "conf"), "experiment=quiet",
         f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    lines = (train.stdout + train.stderr).splitlines()
    assert any("step      4" in line for line in lines), "the run logged its steps"
    assert [line for line in lines if WARNING_LINE.search(line)] == []
    export = subprocess.run(
        [sys.executable, "-m", "orchestration.export", str(run_dir / "checkpoints/step_00000004"),
         str(tmp_path / "hf")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    out = (export.stdout + export.stderr).splitlines()
    assert [line for line in out if WARNING_LINE.search(line)] == []
    assert len(out) <= 2 and "exported" in out[-1], out
    assert Path(tmp_path / "hf" / "model.safetensors").is_file()


def test_checkpoint_writer_helper_imports_no_megatron():
    """The writer helper is a spawned process that imports its initializer's module without
    the command's warning filters: importing megatron there printed its four import-time
    notices in every training run's output."""
    from megatron_patches import writer_queue

    module = writer_queue.harden_server.__module__
    probe = f"import sys, {module}; print('megatron' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert out.stdout.strip() == "False"
