"""fedmpi's own error types: bad input ends the job with one line and exit code 2."""
from typing import Optional


class FedmpiError(Exception):
    """Base class for every error fedmpi reports as a one-line message (exit code 2).

    `everywhere` says how the job ends. False (the default): this rank may have failed alone while
    the others wait in a collective for it, so it prints its line and MPI_Abort ends the world.
    True: every rank raised this error at the same point, so each can simply exit with
    `exit_code` (rank 0 prints the line, no MPI_Abort, no launcher noise). Only an agreement
    point sets it (`runtime.comm.agreed`: an allgather of every rank's outcome), never a guess
    that the ranks "surely" saw the same input: one rank exiting while others wait would hang.
    """

    exit_code = 2
    everywhere = False
    origin: Optional[int] = None  # with everywhere: the rank that failed, None when all failed alike


class ConfigError(FedmpiError):
    """A config key, value or command-line flag is wrong."""


class DataError(FedmpiError):
    """A data source or HDF5 shard file is missing or malformed."""


class OutputError(FedmpiError):
    """A file of the run could not be written (disk full, no permission, a file in the way)."""
