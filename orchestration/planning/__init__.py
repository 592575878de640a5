"""Arithmetic for planning runs: memory per GPU (``memory``) and scaling laws (``scaling_law``).
FLOPs and parameter counts live in ``orchestration.metrics.flops`` (training logs MFU with them)."""
