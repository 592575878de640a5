"""The warnings known to be harmless, silenced at the commands' entry points; the rest stay.

Why: a training run printed about eight warnings per rank and an export 14 warning lines in 21,
every one of them about a choice this project made on purpose or about an API Megatron-Core
calls. Real warnings drowned in them. Each entry below says why it is harmless; anything not
listed is still shown. The filters are installed by each command's ``main()`` (``train``,
``export``, ``evaluate``, ``import_hf``, ``average``, ...), before megatron-core is imported,
because its fallback warnings fire at import time (``tests/test_quiet.py`` checks that no
command imports megatron before ``main()`` runs, and counts the warning lines of a short
training run and an export). Library use (tests, notebooks) keeps every warning.

Not a Python warning, so not filterable here: PyTorch's C++ notice that
``TORCH_NCCL_TRACE_BUFFER_SIZE`` is deprecated. ``launch/common.sh`` now sets its replacement,
``TORCH_FR_BUFFER_SIZE`` (and ``TORCH_FR_DUMP_TEMP_FILE`` for ``TORCH_NCCL_DEBUG_INFO_TEMP_FILE``),
the flight recorder's names in torch 2.13.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    category: type[Warning]
    message: str  # a regular expression matched at the start of the message
    why: str  # why it is harmless: the reason it may be silenced


KNOWN_HARMLESS = (
    KnownWarning(
        UserWarning, r"Transformer Engine and Apex are not installed\. Falling back",
        "Megatron-Core's import-time notice that it uses its own multi-tensor kernels and torch "
        "optimizers. On the CPU that is the only path; on GPUs Transformer Engine is in the "
        "image (the Dockerfile fails without it) and then this is never printed."),
    KnownWarning(
        UserWarning, r"Apex is not installed\. Falling back to Torch Norm",
        "Megatron-Core's import-time notice for its local-spec norms: the project's local spec "
        "uses torch's RMSNorm/LayerNorm on purpose (megatron_patches/llama_spec.py); the TE "
        "spec fuses the norm into the next linear layer instead."),
    KnownWarning(
        UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope",
        "Raised by TransformerConfig's own default cuda_graph_scope='full' in megatron-core "
        "0.16 for every config, whether or not CUDA graphs are used (cuda_graph_impl='none' "
        "here); Megatron converts it to the new empty list itself."),
    KnownWarning(
        FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` "
        r"is deprecated",
        "torch 2.13 renamed these collectives (*_single); Megatron-Core's DDP and distributed "
        "optimizer still call the old names, which remain aliases of the same operation."),
    KnownWarning(
        FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions",
        "torch.distributed.checkpoint's old name for `load`, called by Megatron-Core's "
        "dist_checkpointing load strategy: same function, same files."),
    KnownWarning(
        FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
        "dist_checkpointing builds torch ShardedTensors to describe shards on disk (Megatron-"
        "Core's format); the checkpoints load as before."),
)


def install_warning_filters() -> None:
    """Ignore :data:`KNOWN_HARMLESS` in this process (and the processes it forks), and keep
    Megatron-Core's INFO logs (which backend Megatron-FSDP found, ...) out of the output, as
    training does; its warnings and errors still show."""
    for known in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category)
    logging.getLogger("megatron").setLevel(logging.WARNING)
