"""The local engine: base models, the training worker, inference. Heavy imports stay inside."""
