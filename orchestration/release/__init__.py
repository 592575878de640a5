"""What a fully open release publishes beside the weights: the prompt answers of every kept
checkpoint (``prompts``) and a static gallery site of the run (``collect``, ``figures``,
``site``), tested in a headless browser (``browser``). Commands: ``orchestration.prompts``,
``orchestration.gallery``."""
