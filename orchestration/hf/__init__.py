"""Hugging Face interop: Llama weight mapping and muP folding (``llama``), the tokenizer files
(``tokenizer``) and opening a checkpoint in one CPU process (``offline``)."""
