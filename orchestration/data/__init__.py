"""What a stage reads: the tokenizer facts Megatron needs, the blended datasets of a stage
and the step-indexed batches (``tokenizer``, ``datasets``, ``batches``)."""
