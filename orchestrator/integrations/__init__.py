"""One-line integrations of popular training loops with the orchestrator's progress reports."""
