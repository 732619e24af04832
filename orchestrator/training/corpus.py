"""A real text corpus present offline on every machine: the Python standard library's source.

The bytes of the stdlib's ``.py`` files, concatenated in sorted path order,
capped at ``max_bytes``. Every rank reads the same bytes; which windows a
rank trains on is a pure function of (seed, step, data-parallel rank), so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path

import torch

DEFAULT_MAX_BYTES = 8 * 1024 * 1024


def stdlib_sources() -> list[Path]:
    """The stdlib's ``.py`` files in a fixed order (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=2)
def load_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """The corpus as a 1-D uint8 tensor; read once per process (a rejoining rank re-uses it)."""
    chunks, size = [], 0
    for path in stdlib_sources():
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    blob = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator that depends only on (seed, step)."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def batch(
    corpus: torch.Tensor, *, seed: int, step: int, seq_len: int, micro_batch: int, dp_rank: int, dp_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This data-parallel rank's slice of step ``step``'s global batch: (inputs, targets).

    The global batch (``micro_batch * dp_size`` windows) is the same however
    it is split, so a change of world size keeps the data the model sees.
    """
    starts = torch.randint(
        0, corpus.numel() - seq_len - 1, (micro_batch * dp_size,), generator=step_generator(seed, step)
    )
    mine = starts[dp_rank * micro_batch : (dp_rank + 1) * micro_batch]
    windows = torch.stack([corpus[s : s + seq_len + 1] for s in mine.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def split_heldout(corpus: torch.Tensor, heldout_bytes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bytes to train on, the last ``heldout_bytes`` kept for evaluation, or None when 0)."""
    if heldout_bytes == 0:
        return corpus, None
    return corpus[:-heldout_bytes], corpus[-heldout_bytes:]


def heldout_windows(heldout: torch.Tensor, *, seq_len: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` windows evenly spaced over the held-out bytes: (inputs, targets), the same for every
    run that holds out the same bytes, whatever its model or world size."""
    starts = torch.linspace(0, heldout.numel() - seq_len - 1, count).long().tolist()
    windows = torch.stack([heldout[s : s + seq_len + 1] for s in starts]).long()
    return windows[:, :-1], windows[:, 1:]
