"""subnormals_flushed reaches torch's intra-op threads: with two threads, every element of a parallel kernel reads a
subnormal input as 0 inside the block (torch.set_flush_denormal alone sets only the calling thread), and none does
after it."""

from __future__ import annotations

import pytest
import torch

from gatelens.analysis.norms import subnormals_flushed
from gatelens.analysis.worker_fenv import _reach

ELEMENTS = 1 << 20  # far above torch's grain size (32768): the kernel is split across the threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(_reach() is None, reason="torch does not run on an OpenMP runtime this process can reach")
def test_every_intra_op_thread_flushes_inside_the_block_and_none_after(two_threads: None) -> None:
    subnormal = torch.full((ELEMENTS,), torch.finfo(torch.float32).tiny / 4)
    subnormal * 1.0  # the thread pool exists before the block, as in any session that has used torch
    with subnormals_flushed():
        assert bool(((subnormal * 1.0) == 0).all())
    assert bool(((subnormal * 1.0) != 0).all())
