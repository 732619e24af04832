"""Monitoring: the event log, terminal progress and (later) Prometheus export."""
