"""Data-parallel scoring: under torchrun, accelerate launch or deepspeed, each rank scores a slice of the sequences
and every rank gets all the scores back, in order; without a launcher it is one process doing everything."""

from __future__ import annotations

from typing import Callable, Optional

from accelerate import PartialState
from accelerate.utils import gather_object

from useful_code.hardware import has_accelerator


def process_state() -> PartialState:
    """The launcher's process group (one process without a launcher); gloo on a machine without a GPU, where
    Accelerate would otherwise see no distributed set-up and let every rank score everything."""
    return PartialState(cpu=not has_accelerator())


def map_across_ranks(state: Optional[PartialState], score: Callable[[list], list], items: list) -> list:
    """score(items) with the items split into contiguous slices, one per rank; returns every rank's results
    concatenated in rank order, which is items' order. score must return one result per item, in order."""
    if state is None or state.num_processes == 1:
        return score(items)
    with state.split_between_processes(items) as part:
        local = score(list(part))
    if len(local) != len(part):
        raise RuntimeError(f"rank {state.process_index}: {len(local)} results for {len(part)} items")
    return gather_object(local)


def finish(state: PartialState) -> None:
    """Wait for every rank (the main one writes the outputs), then close the process group: a rank that exits while
    another still holds gloo's connections aborts ("terminate called without an active exception")."""
    state.wait_for_everyone()
    state.destroy_process_group()
