"""Checkpoints: DeepSpeed shards plus per-rank state, committed by the controller."""
