"""fedmpi: federated averaging as an MPI job, from HDF5 shards, with per-round communication cost.

`fedmpi.run(config, model=..., loss=...)` runs a job from a Python script (see fedmpi.api.run);
the `fedmpi` command does the same from a shell. Importing fedmpi is cheap: torch and MPI load on use.
"""
from typing import Any

from .errors import ConfigError, DataError, FedmpiError, OutputError

__version__ = "0.1.0"
__all__ = ["run", "Config", "load_config", "FedmpiError", "ConfigError", "DataError", "OutputError", "RunStopped",
           "world_rank"]


def run(*args: Any, **kwargs: Any):
    """Run federated training on every rank of this MPI job; the metrics rows on rank 0 (fedmpi.api.run)."""
    from .api import run as api_run

    return api_run(*args, **kwargs)


def __getattr__(name: str) -> Any:
    """Config, load_config and RunStopped on first use (their modules import yaml and MPI helpers)."""
    if name in ("Config", "load_config"):
        from . import config

        return getattr(config, name)
    if name in ("RunStopped", "world_rank"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedmpi' has no attribute {name!r}")
