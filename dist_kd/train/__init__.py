"""Training loops on a DeepSpeed engine: general and task distillation, checkpoint and resume."""
