"""A Ray-based orchestrator for DeepSpeed training jobs.

The main flow: ``cli`` parses the command line, ``config`` loads and validates
one typed config tree, ``controller`` drives the job as a state machine over a
group of node agents (``agent``, one Ray actor per node), and each agent runs
its node's training processes (``worker``), whose loop lives in ``training`` (or the user's: an entry point, or a script run
as torchrun would, ``worker/script.py``). Training code imports from ``orchestrator.api``;
``orchestrator.report`` is the one-line progress report for any script.
"""

from orchestrator.worker.reporter import report

__all__ = ["report"]
__version__ = "0.1.0"
