"""Scaling-law prediction: plan a sweep of small runs, run it, fit it, predict the big run, watch it.

``plan`` (the sweep), ``sweep`` (running it), ``law`` (the fits), ``predict`` (the prediction
document), ``plot`` (its picture); ``orchestrator scaling`` is the command.
"""
