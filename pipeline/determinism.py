"""Reproducible torch sections for the trainers (RPN, projection, backbone fine-tuning).

Training runs single-threaded so that reductions are bit-reproducible (the Ray Train run and the plain
in-process run must give the same weights), and, where a seed is given, with the global RNG seeded inside
and restored afterwards, so that callers' random state is left untouched.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def single_threaded_torch(seed: int | None = None) -> Iterator[None]:
    """Run torch with one intra-op thread (restored afterwards); with ``seed``, also seed the global RNG
    inside a forked RNG state so the caller's generator is unchanged."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if seed is None:
            yield
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                yield
    finally:
        torch.set_num_threads(before)


__all__ = ["single_threaded_torch"]
