"""Data-parallel scoring: under torchrun, accelerate launch or deepspeed, each rank scores a slice of the sequences
and every rank gets all the scores back, in order; without a launcher it is one process doing everything."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, redirect_stdout
from traceback import print_exception
from typing import Callable, Optional

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from useful_code.cli import UserError, report_error
from useful_code.hardware import has_accelerator


def process_state() -> PartialState:
    """The launcher's process group (one process without a launcher); gloo on a machine without a GPU, where
    Accelerate would otherwise see no distributed set-up and let every rank score everything."""
    return PartialState(cpu=not has_accelerator())


def map_across_ranks(state: Optional[PartialState], score: Callable[[list], list], items: list) -> list:
    """score(items) with the items split into contiguous slices, one per rank; returns every rank's results
    concatenated in rank order, which is items' order. score must return one result per item, in order. A UserError
    on any rank (a NaN in its slice, a row it refuses) stops every rank with its line, after the gather: a rank that
    stopped on its own left the others to die at the gather with a gloo traceback."""
    if state is None or state.num_processes == 1:
        return score(items)
    with state.split_between_processes(items) as part:
        try:
            local, error = score(list(part)), ""
        except UserError as err:
            local, error = [], f"{err} (counted within rank {state.process_index}'s share of the items)"
    if not error and len(local) != len(part):
        raise RuntimeError(f"rank {state.process_index}: {len(local)} results for {len(part)} items")
    shares = gather_object([(local, error)])  # one (results, error) per rank, in rank order
    failed = next((share_error for _, share_error in shares if share_error), "")
    if failed:
        _stop_together(state, failed)
    return [result for share, _ in shares for result in share]


def _failure(err: BaseException) -> str:
    """The line the other processes stop with when the main process fails with err."""
    return str(err) if isinstance(err, UserError) else f"the main process stopped ({type(err).__name__})"


def _stop_together(state: PartialState, error: str, main_error: Optional[BaseException] = None):
    """Every process stops on one failure (the main process's, or a rank's share in map_across_ranks): each prints
    its line (the main process its traceback, or the UserError's line), then all meet at a barrier and close the
    process group, then exit. torchrun stops the remaining workers as soon as one exits with an error, so a rank that
    printed after the first exit could lose its line (seen under CI load)."""
    crashed = main_error is not None and not isinstance(main_error, UserError)
    if crashed:
        print_exception(main_error)
        sys.stderr.flush()
    else:
        report_error(error)
    finish(state)  # a process that exits with gloo's connections open aborts ("terminate called ...")
    sys.exit(1 if crashed else 2)


def on_main(state: PartialState, action: Callable):
    """action() on the main process, its result broadcast to every process. If it fails, every process stops: a
    UserError as its one line everywhere, anything else with its traceback on the main process and one line on the
    others (which would otherwise wait for the main one at the next collective)."""
    if state.num_processes == 1:
        return action()
    outcome = [None, None]
    if state.is_main_process:
        try:
            outcome[0] = action()
        except BaseException as err:
            outcome[1] = _failure(err)
            broadcast_object_list(outcome)
            _stop_together(state, outcome[1], err)
    result, error = broadcast_object_list(outcome)
    if error:
        _stop_together(state, error)
    return result


@contextmanager
def main_process_first(state: PartialState):
    """The block on the main process first (it fills the datasets cache), then on the others (they read it). If the
    main process's block fails, every process stops with its error as one line: with Accelerate's
    main_process_first (barriers only) the others, waiting at a barrier, die on a closed connection with a
    traceback. The others' block prints nothing to stdout: they read the same data, and the main process has said
    its notes (drops, truncations) once."""
    if state.num_processes == 1:
        yield
        return
    error = [None]
    if state.is_main_process:
        try:
            yield
        except BaseException as err:
            error[0] = _failure(err)
            broadcast_object_list(error)
            _stop_together(state, error[0], err)
        broadcast_object_list(error)
        return
    broadcast_object_list(error)
    if error[0]:
        _stop_together(state, error[0])
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
        yield


def finish(state: PartialState) -> None:
    """Wait for every rank (the main one writes the outputs), then close the process group: a rank that exits while
    another still holds gloo's connections aborts ("terminate called without an active exception")."""
    state.wait_for_everyone()
    state.destroy_process_group()
