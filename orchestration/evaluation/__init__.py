"""Downstream benchmarks with EleutherAI's lm-eval: the options (``options``), running it on an
exported folder with local task data (``runner``), and the per-checkpoint results on disk with
their cache (``results``). ``orchestration.evaluate`` is the command,
``orchestration.callbacks.lm_eval`` the in-training hook."""
