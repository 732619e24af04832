"""DeepSpeed checkpoints in the run directory, committed by the controller.

Layout under ``RUN_DIR/checkpoints/``::

    global_step50/            DeepSpeed's shards for step 50
        ...                   (model states, per-rank ZeRO optimizer shards)
        rank_state_00000.pt   per-rank orchestrator state: step and RNG states
    latest                    the committed tag, written last and atomically

Every rank saves with ``save_latest=False``; only the controller writes
``latest``, after every rank has reported its shards saved, so ``latest``
never names a checkpoint some rank has not finished. Loading unpickles
DeepSpeed's files: only load checkpoints you trust.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

LATEST = "latest"
_TAG_PREFIX = "global_step"


def tag_for(step: int) -> str:
    """DeepSpeed's own tag naming, so its tools (zero_to_fp32, ds_to_universal) work."""
    return f"{_TAG_PREFIX}{step}"


def step_of(tag: str) -> int:
    """Inverse of :func:`tag_for`."""
    assert tag.startswith(_TAG_PREFIX), tag
    return int(tag.removeprefix(_TAG_PREFIX))


def save(engine: Any, directory: Path, step: int, rank: int, user_state: dict | None) -> str:
    """Save this rank's part of checkpoint ``step``; returns its tag. Collective: all ranks call it."""
    import torch

    tag = tag_for(step)
    engine.save_checkpoint(str(directory), tag=tag, client_state={"user": user_state}, save_latest=False)
    torch.save({"step": step, "rng": _capture_rng()}, directory / tag / _rank_state_name(rank))
    return tag


def load(engine: Any, directory: Path, tag: str, rank: int) -> tuple[int, dict | None]:
    """Load checkpoint ``tag`` into ``engine``; restores this rank's RNG. Returns (step, user state)."""
    import torch

    path, client = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag} in {directory}")
    # Trusted-only: these files are written by this orchestrator (see module docstring).
    own = torch.load(directory / tag / _rank_state_name(rank), weights_only=False)
    _restore_rng(own["rng"])
    return own["step"], (client or {}).get("user")


def committed_tag(directory: Path) -> str | None:
    """The tag ``latest`` names, or None when nothing was committed yet."""
    try:
        tag = (directory / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return tag or None


def commit(directory: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically (write a temp file, fsync, rename)."""
    tmp = directory / f".{LATEST}.tmp"
    with open(tmp, "w") as fh:
        fh.write(tag)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / LATEST)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def prune(directory: Path, keep_last: int) -> list[str]:
    """Delete committed checkpoints older than the newest ``keep_last``; never the one ``latest`` names."""
    current = committed_tag(directory)
    if current is None:
        return []
    newest = step_of(current)
    tags = sorted(
        (p.name for p in directory.iterdir() if p.is_dir() and p.name.startswith(_TAG_PREFIX)),
        key=step_of,
    )
    committed = [t for t in tags if step_of(t) <= newest]
    doomed = committed[:-keep_last] if len(committed) > keep_last else []
    for tag in doomed:
        shutil.rmtree(directory / tag, ignore_errors=True)
    return doomed


def _rank_state_name(rank: int) -> str:
    return f"rank_state_{rank:05d}.pt"


def _capture_rng() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
