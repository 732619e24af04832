"""Hugging Face ``Trainer`` integration: ``trainer.add_callback(OrchestratorCallback())``.

Every optimizer step becomes a ``step`` event (loss, learning rate and grad norm on the steps the
Trainer logs, with ``logging_steps: 1`` on every step; tokens when
``include_num_input_tokens_seen`` is on), ``max_steps`` drives the progress bar, a resumed run
says from which step, and every checkpoint the Trainer saves is reported. Evaluation batches count
as signs of progress, so a long evaluation is not taken for a hang. Outside the orchestrator (under
torchrun, or plain ``python``) the callback does nothing.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from orchestrator.worker import reporter


class OrchestratorCallback(TrainerCallback):
    """Reports a Trainer's progress to the orchestrator; a no-op outside it."""

    def __init__(self) -> None:
        self._pending: int | None = None  # a finished step whose loss the Trainer is about to log
        self._tokens_seen = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._tokens_seen = state.num_input_tokens_seen
        if state.global_step > 0:  # resumed: the Trainer restored its state from checkpoint-N
            reporter.report_resumed(state.global_step, f"checkpoint-{state.global_step}")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush(state)
        if control.should_log:
            self._pending = state.global_step  # on_log follows with its loss
        else:
            self._report(state, state.global_step, {})

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self._pending is not None and logs and "loss" in logs:
            step, self._pending = self._pending, None
            self._report(state, step, logs)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush(state)
        reporter.report_checkpoint(state.global_step, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        reporter.report_busy()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush(state)

    def _flush(self, state: Any) -> None:
        """Report a step whose log never came (it had no loss)."""
        if self._pending is not None:
            step, self._pending = self._pending, None
            self._report(state, step, {})

    def _report(self, state: Any, step: int, logs: dict[str, float]) -> None:
        tokens = None
        if state.num_input_tokens_seen:
            tokens, self._tokens_seen = state.num_input_tokens_seen - self._tokens_seen, state.num_input_tokens_seen
        reporter.report(step, logs.get("loss"), total_steps=state.max_steps or None, tokens=tokens,
                        lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"))
