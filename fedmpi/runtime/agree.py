"""Errors every rank agrees on: a check or a write done on some ranks ends all of them with the same line.

A FedmpiError raised on one rank alone would leave the others waiting in their next collective until
MPI_Abort; here the error travels in one small collective instead, so every rank raises it. The raised
error is marked `everywhere` (every rank holds it, so the job may end without MPI_Abort) with `origin`,
the rank that found it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..errors import FedmpiError


def on_rank0(comm, work: Callable[[], Any]) -> Optional[Any]:
    """Collective: `work()` on rank 0 only; its FedmpiError, if any, is raised on every rank.

    Returns work's result on rank 0, None on the others.
    """
    result, error = None, None
    if comm.rank == 0:
        try:
            result = work()
        except FedmpiError as err:
            error = err
    error = comm.bcast(error)
    if error is not None:
        raise _everywhere(error, 0)
    return result


def on_every_rank(comm, work: Callable[[], Any]) -> list:
    """Collective: `work()` on every rank; the first failing rank's FedmpiError is raised on all of them.

    Returns every rank's result, in rank order (the same list on every rank).
    """
    try:
        outcome = (work(), None)
    except FedmpiError as err:
        outcome = (None, err)
    outcomes = comm.allgather(outcome)
    for rank, (_, error) in enumerate(outcomes):
        if error is not None:
            raise _everywhere(error, rank)
    return [result for result, _ in outcomes]


def _everywhere(error: FedmpiError, origin: int) -> FedmpiError:
    error.everywhere, error.origin = True, origin
    return error
