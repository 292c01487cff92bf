"""fedmpi's own error types: bad input ends the job with one line and exit code 2."""


class FedmpiError(Exception):
    """Base class for every error fedmpi reports as a one-line message (exit code 2)."""

    exit_code = 2


class ConfigError(FedmpiError):
    """A config key, value or command-line flag is wrong."""


class DataError(FedmpiError):
    """A data source or HDF5 shard file is missing or malformed."""


class OutputError(FedmpiError):
    """A file of the run could not be written (disk full, no permission, a file in the way)."""
