"""Per-rank side: the Ray actor that owns a training process, and that process's runtime."""
