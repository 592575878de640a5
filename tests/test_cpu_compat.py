"""The CPU layer: what it rewrites, and that the upstream symbols it replaces still exist."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import REPO


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_patched_symbols_exist_upstream():
    """Fails when Megatron-Core or torch moves a symbol the layer replaces (fresh process)."""
    out = _python("""
        import importlib
        from megatron_patches.cpu_compat import PATCHED_SYMBOLS
        for module, attr in PATCHED_SYMBOLS:
            assert hasattr(importlib.import_module(module), attr), f"{module}.{attr} moved"
        import megatron.core.models.common.embeddings.rotary_pos_embedding as rope, inspect
        assert "torch.cuda.current_device()" in inspect.getsource(rope), "RoPE no longer needs it"
        print("ok")
    """)
    assert out.strip() == "ok"


def test_mode_maps_cuda_to_cpu_and_keeps_autograd():
    out = _python("""
        import torch
        from megatron_patches import cpu_compat
        assert cpu_compat.enable(force=True)
        a = torch.zeros(3, device="cuda")
        b = torch.ones(3).to(torch.cuda.current_device()).cuda()
        c = torch.empty(2, device=torch.device("cuda", 0), pin_memory=True)
        assert {a.device.type, b.device.type, c.device.type} == {"cpu"}
        assert a.type() == "torch.cuda.FloatTensor" and a.to(torch.bfloat16).dtype == torch.bfloat16
        w = torch.ones(3, requires_grad=True)
        class Twice(torch.autograd.Function):  # a custom backward must run inside the mode
            @staticmethod
            def forward(ctx, x):
                return x * 2
            @staticmethod
            def backward(ctx, g):
                return g * 2 + torch.zeros_like(g, device="cuda")
        Twice.apply(w).sum().backward()
        assert w.grad.tolist() == [2.0, 2.0, 2.0]
        torch.cuda.synchronize(); torch.cuda.current_stream().wait_stream(None)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_not_enabled_when_cuda_present_unless_forced():
    import torch

    from megatron_patches import cpu_compat

    if torch.cuda.is_available():
        assert cpu_compat.enable() is False
    else:
        pytest.skip("no CUDA here: the layer is enabled on this machine by design")
