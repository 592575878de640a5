"""The one boundary between this project and megatron-core.

Every ``import megatron`` of the project lives in this package (``tests/test_architecture.py``
enforces it), so a megatron-core upgrade is a change here and nowhere else:

- ``configs``: a :class:`~orchestration.config.RunConfig` to ``TransformerConfig``,
  ``OptimizerConfig`` and ``DistributedDataParallelConfig`` (the one mapping);
- ``model``: ``GPTModel`` with the LLaMA layer spec (``llama_spec``), its DDP wrapper, muP;
- ``optimizer``: Megatron's optimizer, the schedule hooks, the LR written into param groups and
  the vetoable step (``guarded_step``);
- ``schedule``: the pipeline schedule that runs forward and backward over micro-batches;
- ``parallel``: model-parallel groups, seeds, layout queries, one-rank worlds for tools;
- ``checkpointing``: ``dist_checkpointing`` save/load, sync and async;
- ``datasets``: ``BlendedMegatronDatasetBuilder``, ``GPTDataset`` and the indexed-file format;
- ``generation``: greedy decoding with the training model;
- patches that megatron-core 0.16 needs: ``cpu_compat`` (CPU/gloo), ``optimizer_state`` (Adam
  state round-trip), ``mup`` (upstream added muP later).

Import submodules directly (``from megatron_patches.model import build_gpt_model``); this file
imports nothing, so ``import megatron_patches`` stays cheap.
"""
