"""Checkpoints on disk: the ``step_*`` layout (``layout``) and atomic save, load and fallback
(``store``). What goes into the shards is ``megatron_patches.checkpointing``'s business."""
