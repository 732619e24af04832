"""The built-in corpus and batches: real stdlib bytes, batches a pure function of (seed, step)."""

from __future__ import annotations

import torch

from orchestrator.training.corpus import batch, load_corpus, stdlib_sources


def test_corpus_is_real_text_in_a_fixed_order() -> None:
    files = stdlib_sources()
    assert len(files) > 100
    assert files == stdlib_sources()
    corpus = load_corpus(max_bytes=1 << 20)
    assert corpus.numel() == 1 << 20
    assert b"def " in bytes(corpus[:200_000].tolist())


def test_batches_depend_only_on_seed_and_step() -> None:
    corpus = load_corpus(max_bytes=1 << 20)
    kw = dict(seed=1, seq_len=16, micro_batch=4, dp_rank=0, dp_size=2)
    x1, y1 = batch(corpus, step=5, **kw)
    x2, y2 = batch(corpus, step=5, **kw)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, batch(corpus, step=6, **kw)[0])
    assert torch.equal(x1[:, 1:], y1[:, :-1]), "targets are inputs shifted by one"


def test_global_batch_is_the_same_however_it_is_split() -> None:
    corpus = load_corpus(max_bytes=1 << 20)
    whole, _ = batch(corpus, seed=3, step=9, seq_len=16, micro_batch=8, dp_rank=0, dp_size=1)
    halves = [batch(corpus, seed=3, step=9, seq_len=16, micro_batch=4, dp_rank=r, dp_size=2)[0] for r in (0, 1)]
    assert torch.equal(whole, torch.cat(halves))
