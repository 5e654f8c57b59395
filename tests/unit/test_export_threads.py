"""Rank 0 exports alone while the other ranks of its node wait in a collective: it borrows their
CPU threads for that step (on the CPU only) and gives them back after, also after a failure
(``measure.torch_threads``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from orchestrator import loop
from orchestrator.compress.measure import torch_threads

pytestmark = pytest.mark.unit


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def test_rank_zero_runs_on_the_threads_of_its_node_then_gives_them_back(one_thread) -> None:
    with torch_threads(loop._node_threads(2, torch.device("cpu"))):
        inside = torch.get_num_threads()
    assert inside == min(2, _cores())
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize(
    ("local_world_size", "device"),
    [(1, "cpu"), (4, "meta")],  # alone on its node; an accelerator's ranks (not the CPU)
)
def test_threads_unchanged_without_idle_cpu_ranks(
    one_thread, local_world_size: int, device: str
) -> None:
    assert loop._node_threads(local_world_size, torch.device(device)) is None
    with torch_threads(None):
        assert torch.get_num_threads() == 1


def test_threads_never_exceed_the_cores_this_process_may_use(one_thread) -> None:
    with torch_threads(loop._node_threads(10_000, torch.device("cpu"))):
        assert torch.get_num_threads() == _cores()
    assert torch.get_num_threads() == 1


def test_threads_given_back_when_the_export_fails(one_thread) -> None:
    with pytest.raises(RuntimeError), torch_threads(2):
        raise RuntimeError("export failed")
    assert torch.get_num_threads() == 1
