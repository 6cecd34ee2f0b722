"""DeepSpeed training: launch detection, DeepSpeed configs, the loop, checkpoints, export."""
