"""The hook set (``base``), the registry that builds callbacks from config (``registry``), and
the callbacks every run has: metrics, evaluation, samples, checkpoint timing, preemption and
loss-spike skipping. A new callback is a :class:`~orchestration.callbacks.base.Callback`
subclass, registered by name or named in config as ``module:Class``."""
