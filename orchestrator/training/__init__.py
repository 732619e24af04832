"""The built-in workload: a small byte-level GPT trained with DeepSpeed on an offline corpus."""
