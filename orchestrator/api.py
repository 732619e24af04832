"""Everything training code imports from the orchestrator, in one place.

    from orchestrator.api import TrainContext, report                # a training function, any script
    from orchestrator.api import OrchestratorCallback                # Hugging Face Trainer (imports transformers)

``report`` and its companions are no-ops outside the orchestrator, so a script that calls them
still runs under torchrun or plain ``python``. See docs/user-api.md and docs/scripts.md.
"""

from __future__ import annotations

from typing import Any

from orchestrator.worker.context import TrainContext
from orchestrator.worker.reporter import report, report_busy, report_checkpoint, report_resumed

__all__ = ["TrainContext", "report", "report_busy", "report_checkpoint", "report_resumed"]


def __getattr__(name: str) -> Any:
    # Imported on first use: it needs transformers, which most training code never imports.
    if name == "OrchestratorCallback":
        from orchestrator.integrations.hf import OrchestratorCallback

        return OrchestratorCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
