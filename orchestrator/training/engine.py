"""DeepSpeed engine set-up for the built-in workload: ZeRO stage and AutoTP rules from the config."""

from __future__ import annotations

from typing import Any

from orchestrator.config.schema import Config
from orchestrator.worker.context import deepspeed_precision

# AutoTP cannot infer a policy for a custom model; these rules name our GPT's layers.
TP_LAYER_SPECS = [
    {"patterns": [r".*\.[qkv]_proj\.weight$", r".*\.up_proj\.weight$"], "partition_type": "column"},
    {"patterns": [r".*\.o_proj\.weight$", r".*\.down_proj\.weight$"], "partition_type": "row"},
]


def deepspeed_config(config: Config) -> dict[str, Any]:
    """The DeepSpeed JSON config for this job."""
    ds: dict[str, Any] = {
        # Only the micro batch: train_batch_size would be checked against TP ranks too.
        "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
        "gradient_accumulation_steps": config.accumulation_steps(config.data_parallel_size),
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": config.train.lr, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": config.parallel.zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        **deepspeed_precision(config.train.precision),
    }
    if config.parallel.tensor_parallel > 1:
        ds["tensor_parallel"] = {
            "autotp_size": config.parallel.tensor_parallel,
            "partition_config": {"use_default_specs": False, "layer_specs": TP_LAYER_SPECS},
        }
    return ds


def build_engine(config: Config, model: Any) -> Any:
    """``deepspeed.initialize`` for ``model``; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(config)
    )
    return engine
