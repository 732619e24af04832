"""PyTorch Lightning integration: ``Trainer(callbacks=[..., OrchestratorCallback()])``.

Every optimizer step becomes a ``step`` event (rank 0's loss of the batch, the learning rate of
the first optimizer), ``max_steps`` (or Lightning's estimate of the steps) drives the progress
bar, a run resumed from a checkpoint (``trainer.fit(..., ckpt_path=...)``) says from which step,
and every checkpoint the Trainer saves is reported. Validation batches count as signs of
progress, so a long validation is not taken for a hang. Outside the orchestrator (under torchrun,
or plain ``python``) the callback does nothing.

Written for the ``lightning`` package (``lightning.pytorch``); with only ``pytorch_lightning``
installed, it is built on that one.
"""

from __future__ import annotations

from typing import Any

from orchestrator.worker import reporter

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older standalone package
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]


class OrchestratorCallback(Callback):
    """Reports a Lightning Trainer's progress to the orchestrator; a no-op outside it."""

    def __init__(self) -> None:
        self._reported = -1  # the last optimizer step reported (batches accumulate between steps)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._reported = trainer.global_step
        if trainer.global_step > 0:  # resumed: fit() restored the loop from ckpt_path
            reporter.report_resumed(trainer.global_step, str(trainer.ckpt_path or ""))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._reported:
            return  # a micro-batch of an accumulating step
        self._reported = step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        reporter.report(step, float(loss) if loss is not None else None, total_steps=_total(trainer),
                        lr=_lr(trainer))

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        where = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        reporter.report_checkpoint(trainer.global_step, str(where))

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        reporter.report_busy()


def _total(trainer: Any) -> int | None:
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if estimate not in (None, float("inf")) else None


def _lr(trainer: Any) -> float | None:
    optimizers = trainer.optimizers
    return float(optimizers[0].param_groups[0]["lr"]) if optimizers else None
