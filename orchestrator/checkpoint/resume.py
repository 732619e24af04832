"""Choosing the checkpoint a run resumes from, and preparing it for the job's layout.

At start the controller walks the committed checkpoints newest first and
takes the first whose manifest and checksums hold; the damaged ones are
reported (``checkpoint_invalid``, naming the file) and skipped. When the
chosen one was saved with another data-parallel or tensor-parallel size,
it is converted once to DeepSpeed's universal format under
``checkpoints/.universal/TAG``, which every rank then loads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator import events as ev
from orchestrator.checkpoint import store
from orchestrator.checkpoint.manifest import Manifest, verify
from orchestrator.config.schema import Config
from orchestrator.errors import ConfigError
from orchestrator.events import EventLog
from orchestrator.installation import with_interpreter_tools

CONVERSION_TIMEOUT_S = 3600.0


def select(checkpoints: Path) -> tuple[Manifest | None, list[Rejected]]:
    """The newest valid committed checkpoint (``latest`` repaired to name it), or None when there is
    none at all; and the damaged ones newer than it, each moved aside to ``.damaged/`` (never
    deleted: a damaged checkpoint may still be repairable by hand).

    Raises :class:`ConfigError`, changing nothing, when checkpoints exist but every one is damaged:
    starting from step 0 would overwrite them."""
    store.clean_leftovers(checkpoints)
    damaged = []
    for tag in reversed(store.committed_tags(checkpoints)):
        problems = verify(checkpoints / tag)
        if problems:
            damaged.append((tag, problems))
            continue
        if store.latest_tag(checkpoints) != tag:
            store.set_latest(checkpoints, tag)
        rejected = [Rejected(tag=t, problems=p, moved_to=store.set_aside(checkpoints / t, checkpoints))
                    for t, p in damaged]
        return Manifest.read(checkpoints / tag), rejected
    if damaged:
        listing = "; ".join(f"{tag}: {problems[0]}" for tag, problems in damaged)
        raise ConfigError(
            f"--run-dir {checkpoints.parent}: every checkpoint is damaged ({listing}); nothing was changed. "
            f"Repair them, or move {checkpoints} aside to train from step 0, or give another --run-dir"
        )
    return None, []


@dataclass(frozen=True)
class Rejected:
    """A damaged checkpoint skipped at start, and where it was moved."""

    tag: str
    problems: list[str]
    moved_to: Path


def prepare(checkpoints: Path, manifest: Manifest, config: Config, events: EventLog) -> None:
    """Make ``manifest``'s checkpoint loadable by ``config``'s layout (a no-op when it already is)."""
    layout = config.layout
    if manifest.layout == layout:
        return
    saved = f"data-parallel {manifest.data_parallel_size} x tensor-parallel {manifest.tensor_parallel}"
    wanted = f"data-parallel {layout[0]} x tensor-parallel {layout[1]}"
    if manifest.zero_stage == 0:
        raise ConfigError(
            f"parallel.zero_stage: checkpoint {manifest.tag} was saved without ZeRO ({saved}) and cannot be "
            f"converted to {wanted}; resume with the saved layout (cluster.workers_per_node, "
            "parallel.tensor_parallel) or start a new --run-dir"
        )
    target = store.universal_dir(checkpoints) / manifest.tag
    if not target.is_dir():  # renamed into place only once complete
        seconds = convert(checkpoints / manifest.tag, target, manifest.zero_stage)
        events.emit(ev.CheckpointConverted(step=manifest.step, path=str(target), seconds=seconds,
                                           saved_layout=list(manifest.layout), layout=list(layout)))
    global_batch = config.global_batch
    if global_batch != manifest.global_batch:
        events.emit(ev.RunWarning(
            message=f"the global batch changes from {manifest.global_batch} to {global_batch} sequences; "
            f"set train.micro_batch_size={manifest.global_batch // layout[0]} to continue the same optimisation",
        ))


def convert(source: Path, target: Path, zero_stage: int) -> float:
    """Run DeepSpeed's ``ds_to_universal`` on ``source`` into ``target`` (atomically); returns seconds."""
    started = time.monotonic()
    tmp = target.with_name(f"{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(source), "--output_folder", str(tmp),
            # Its process pools hung here (0.19.8, 2 CPUs); one worker each is serial and reliable.
            "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if zero_stage <= 2:
        args.append("--inject_missing_state")  # ZeRO-1/2 shards lack state the converter needs
    env = with_interpreter_tools(dict(os.environ))
    try:
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=CONVERSION_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"converting {source} to the universal format took over {CONVERSION_TIMEOUT_S:.0f}s") from None
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise ConfigError(
            f"cannot convert {source} to DeepSpeed's universal format for the new layout:\n{tail}\n"
            "resume with the saved layout or start a new --run-dir"
        )
    # The universal loader reads the module states (and client state) from the tag's own directory.
    for model_states in source.glob("mp_rank_*_model_states.pt"):
        shutil.copyfile(model_states, tmp / model_states.name)
    os.replace(tmp, target)
    return time.monotonic() - started
