"""Where checkpoints live in the run directory, and the rank's side of saving and loading them.

Layout under ``RUN_DIR/checkpoints/`` (details in ``docs/checkpoints.md``)::

    global_step50/              a committed checkpoint: DeepSpeed's shards, the
        manifest.json           orchestrator's rank_state_*.pt, and the manifest (last)
    latest                      the newest committed tag, replaced atomically
    zero_to_fp32.py             DeepSpeed's consolidation script
    .staging/attempt-N/TAG/     saves in progress; never read, removed at start
    .staging/attempt-N/TAG.rankR.saved.json   a rank's report of a save it made alone (no agent
                                to tell: a scheduler's SIGTERM took it), for the controller
    .universal/TAG/             TAG converted for a different parallel layout
    .damaged/TAG[.N]/           a damaged checkpoint skipped at start, kept for inspection

A rank saves into the staging directory of its attempt. The controller turns
a staged save into a committed checkpoint (``commit.py``) once every rank's
files are durable. Loading unpickles DeepSpeed's files (their model and
optimizer states need it): only load checkpoints you trust. The
orchestrator's own per-rank files are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

from orchestrator.checkpoint.manifest import MANIFEST, Manifest, fsync_dir, write_durably
from orchestrator.checkpoint.memory import rng_state, set_rng_state
from orchestrator.messages import CheckpointSaved, MalformedMessage, decode, encode

LATEST = "latest"
STAGING = ".staging"
UNIVERSAL = ".universal"
TRASH = ".trash"
DAMAGED = ".damaged"
_TAG_PREFIX = "global_step"


def tag_for(step: int) -> str:
    """DeepSpeed's own tag naming, so its tools (zero_to_fp32, ds_to_universal) work."""
    return f"{_TAG_PREFIX}{step}"


def step_of(tag: str) -> int:
    """Inverse of :func:`tag_for`."""
    assert is_tag(tag), tag
    return int(tag.removeprefix(_TAG_PREFIX))


def is_tag(name: str) -> bool:
    return name.startswith(_TAG_PREFIX) and name.removeprefix(_TAG_PREFIX).isdigit()


def staging_dir(checkpoints: Path, attempt: int) -> Path:
    """Where the ranks of ``attempt`` save: a failed attempt's leftovers never mix with the next one's."""
    return checkpoints / STAGING / f"attempt-{attempt}"


def universal_dir(checkpoints: Path) -> Path:
    return checkpoints / UNIVERSAL


def rank_state_name(rank: int) -> str:
    return f"rank_state_{rank:05d}.pt"


def snapshot_save(
    engine: Any, checkpoints: Path, attempt: int, step: int, rank: int, user_state: dict | None
) -> tuple[Path, list[tuple[Path, Any]]]:
    """Copy this rank's part of checkpoint ``step`` to host memory (collective: all ranks call it).

    Returns the staged checkpoint directory and the files to write into it.
    """
    # Imports torch and deepspeed: training processes only.
    from orchestrator.checkpoint import snapshot

    snap = snapshot.install(engine)
    save_dir = staging_dir(checkpoints, attempt)
    tag = tag_for(step)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={"user": user_state}, save_latest=False)
    files = snap.take()
    files.append((save_dir / tag / rank_state_name(rank), {"step": step, "rng": rng_state()}))
    return save_dir / tag, files


def load(engine: Any, checkpoints: Path, tag: str, rank: int, layout: tuple[int, int]) -> tuple[int, dict | None]:
    """Load committed checkpoint ``tag`` into ``engine``. Returns (step, user state).

    ``layout`` is this job's (data-parallel size, tensor-parallel size). When
    the checkpoint was saved with another layout, the
    universal conversion the controller prepared is loaded instead, and the
    per-rank RNG states (which belong to the old layout) are not restored.
    """
    manifest = Manifest.read(checkpoints / tag)
    same_layout = manifest.layout == layout
    if same_layout:
        path, client = engine.load_checkpoint(str(checkpoints), tag=tag)
    else:
        path, client = _load_universal(engine, checkpoints, tag)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag} in {checkpoints}")
    if same_layout:
        own = load_rank_state(checkpoints / tag / rank_state_name(rank))
        set_rng_state(own["rng"])
    return manifest.step, (client or {}).get("user")


def _load_universal(engine: Any, checkpoints: Path, tag: str) -> tuple[Any, Any]:
    source = universal_dir(checkpoints)
    if not (source / tag).is_dir():
        raise FileNotFoundError(f"{source / tag}: no universal conversion of {tag} to load into this layout")
    # DeepSpeed reads this switch from its config; it only changes how the next load reads files.
    engine._config.load_universal_checkpoint = True
    try:
        return engine.load_checkpoint(str(source), tag=tag)
    finally:
        engine._config.load_universal_checkpoint = False


def committed_tags(checkpoints: Path) -> list[str]:
    """Tags of the directories that have a manifest (committed, maybe damaged since), oldest first."""
    if not checkpoints.is_dir():
        return []
    tags = [p.name for p in checkpoints.iterdir() if is_tag(p.name) and (p / MANIFEST).exists()]
    return sorted(tags, key=step_of)


def latest_tag(checkpoints: Path) -> str | None:
    """The tag ``latest`` names, or None."""
    try:
        return (checkpoints / LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None


def set_latest(checkpoints: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically and durably."""
    write_durably(checkpoints / LATEST, tag.encode())


def prune(checkpoints: Path, keep_last: int, protect: set[str]) -> list[str]:
    """Delete committed checkpoints older than the newest ``keep_last``, except those in ``protect``."""
    tags = committed_tags(checkpoints)
    doomed = [t for t in tags[: max(0, len(tags) - keep_last)] if t not in protect]
    for tag in doomed:
        discard(checkpoints / tag, checkpoints)
        shutil.rmtree(universal_dir(checkpoints) / tag, ignore_errors=True)
    return doomed


def discard(path: Path, checkpoints: Path) -> None:
    """Remove a checkpoint directory; renamed away first so no reader ever sees it half deleted."""
    if not path.exists():
        return
    trash = checkpoints / TRASH
    trash.mkdir(exist_ok=True)
    moved = trash / f"{path.name}-{random.getrandbits(32):08x}"
    path.rename(moved)
    shutil.rmtree(moved, ignore_errors=True)
    try:
        trash.rmdir()
    except OSError:
        pass  # another removal still in progress, or a leftover: cleaned at the next start


def set_aside(path: Path, checkpoints: Path) -> Path:
    """Move the damaged checkpoint ``path`` to ``.damaged/`` (a numbered name if taken); returns where."""
    aside = checkpoints / DAMAGED
    aside.mkdir(exist_ok=True)
    target, n = aside / path.name, 0
    while target.exists():
        n += 1
        target = aside / f"{path.name}.{n}"
    path.rename(target)
    fsync_dir(checkpoints)
    return target


def write_saved_report(staged: Path, rank: int, report: CheckpointSaved) -> None:
    """Next to staged checkpoint directory ``staged``: ``rank``'s report that its files are durable."""
    write_durably(staged.parent / f"{staged.name}.rank{rank:05d}.saved.json", json.dumps(encode(report)).encode())


def saved_reports(checkpoints: Path, attempt: int) -> list[tuple[int, CheckpointSaved]]:
    """The reports :func:`write_saved_report` left in ``attempt``'s staging directory: (rank, report)."""
    found = []
    for path in sorted(staging_dir(checkpoints, attempt).glob("*.rank*.saved.json")):
        try:
            report = decode(json.loads(path.read_bytes()))
        except (OSError, ValueError, MalformedMessage):
            continue  # being written, or not ours
        if isinstance(report, CheckpointSaved):
            found.append((int(path.name.split(".rank")[1].split(".")[0]), report))
    return found


def clean_leftovers(checkpoints: Path) -> None:
    """Remove what an interrupted save or delete left behind (staging and trash)."""
    for name in (STAGING, TRASH):
        shutil.rmtree(checkpoints / name, ignore_errors=True)


def load_rank_state(path: Path) -> dict[str, Any]:
    """The orchestrator's own per-rank file (step, RNG states), read with ``weights_only=True``: only
    tensors, plain Python values and the numpy types of an RNG state are accepted, so a crafted file
    cannot run code. (DeepSpeed's own files still need full unpickling: see the module docstring.)"""
    import numpy as np
    import torch

    numpy_rng = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(numpy_rng):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: refused, it holds more than a rank's step and RNG state ({exc})") from None
