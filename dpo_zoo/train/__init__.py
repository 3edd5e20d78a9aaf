"""The pairwise trainer (``trainer``) and its parts: batches from the cache (``batching``), the
DeepSpeed engine (``engine``), verified checkpoints (``checkpoints``), final weights (``saving``) and
their model card (``model_card``), trackers (``tracking``) and the run folder (``run_folder``).
May use: every layer from cache down."""
