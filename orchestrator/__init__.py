"""A Ray-based orchestrator for DeepSpeed training jobs.

The main flow: ``cli`` parses the command line, ``config`` loads and validates
one typed config tree, ``controller`` drives the job as a state machine over a
group of per-rank ``worker`` actors, and each actor runs a training process
whose loop lives in ``training``.
"""

__version__ = "0.1.0"
