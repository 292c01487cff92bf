"""The Python API: `fedmpi.run(config, model=..., loss=...)` from a user's own script under mpirun.

The same job as `fedmpi run` (the command is a thin wrapper over `start_run`): the same checks before
any data is read, the same run directory rules (a lock, `overwrite`, `resume`), the same files. Bad
input raises a FedmpiError subclass on every rank alike instead of ending the process.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .config import FIELD_TYPES, Config, load_config
from .errors import ConfigError, FedmpiError
from .runtime.comm import agreed, fail_job, install_excepthook, world

ConfigLike = Union[Config, dict, str, Path, None]
_HOOKED = False


class RunStopped(FedmpiError):
    """A stop signal ended the run after a checkpoint; `fedmpi.run(..., resume=RUN_DIR)` continues it."""


def run(config: ConfigLike = None, *, model: Union[Callable, str, None] = None,
        loss: Union[Callable, str, None] = None, server_opt: Union[type, str, None] = None,
        out: Union[str, Path, None] = None, overwrite: bool = False,
        resume: Union[str, Path, None] = None, **overrides: Any) -> Optional[list[dict]]:
    """Run federated training on every rank of this MPI job; returns the metrics rows on rank 0, None elsewhere.

    config: a Config, a dict of config keys, the path of a YAML config file, or None (the defaults).
    model: a builder `fn(input_shape=, classes=, **model_args) -> nn.Module` (a module-level function or
    class of your script, e.g. `model=MyNet`) or a config value ("cnn", "pkg.mod:fn").
    loss: `fn(outputs, targets) -> per-sample losses [B]`, or a config value.
    server_opt: a class with the fedmpi.fl.server.ServerOptimizer interface (created with lr=server_lr),
    or a config value ("fedadam", "pkg.mod:Class").
    out: the run directory (default runs/api); overwrite: replace the run it holds; resume: continue the
    run in that directory from its checkpoint (config keys given here must then match its config.yaml).
    overrides: further config keys, e.g. rounds=5 (as `--set rounds=5`).
    Raises ConfigError, DataError, OutputError (FedmpiError subclasses) on every rank alike.
    """
    comm = world()
    global _HOOKED
    if not _HOOKED:  # an uncaught exception on any rank ends the job instead of leaving the others waiting
        install_excepthook()
        _HOOKED = True
    try:
        with agreed(comm):  # a bad argument on any rank: the same error on every rank
            cfg, run_dir = _resolve(config, dict(model=model, loss=loss, server_opt=server_opt), out, resume,
                                    overwrite, overrides)
        code = start_run(cfg, comm, run_dir, resume is not None, overwrite)
    except FedmpiError as err:
        if err.everywhere or comm.size == 1:
            raise
        fail_job(str(err), err.exit_code)  # this rank alone failed while the others wait for it: end the job
        raise
    finally:
        from .plugins import forget

        forget()
    if code:
        raise RunStopped(f"the run in {run_dir} stopped on a signal after a checkpoint; continue it with "
                         f"fedmpi.run(..., resume={str(run_dir)!r})")
    return _read_rows(run_dir) if comm.rank == 0 else None


def world_rank() -> int:
    """This process's rank in the MPI job (0 when not started by mpirun)."""
    return world().rank


def _resolve(config: ConfigLike, objects: dict, out, resume, overwrite: bool, overrides: dict) -> tuple[Config, Path]:
    """The Config to run (objects registered under their import paths) and the run directory."""
    from . import plugins

    values = dict(overrides)
    for key, given in objects.items():
        if given is not None:
            values[key] = given if isinstance(given, str) else plugins.give(key, given)
    if resume is not None:
        if config is not None or out is not None or overwrite:
            raise ConfigError("resume=RUN_DIR continues the run there with its own config.yaml: drop config, out "
                              "and overwrite")
        path = Path(resume) / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"resume={str(resume)!r}: no config.yaml there (not a fedmpi run directory)")
        return load_config(str(path), values), Path(resume)
    return _config(config, values), Path(out if out is not None else "runs/api")


def _config(config: ConfigLike, values: dict) -> Config:
    if isinstance(config, Config):
        unknown = sorted(set(values) - set(FIELD_TYPES))
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(FIELD_TYPES))}")
        return dataclasses.replace(config, **values) if values else config
    if isinstance(config, dict):
        return load_config(None, {**config, **values})
    if config is None or isinstance(config, (str, Path)):
        return load_config(None if config is None else str(config), values)
    raise ConfigError(f"config must be a Config, a dict or the path of a YAML file, got {type(config).__name__}")


def start_run(cfg: Config, comm, run_dir: Path, resume: bool, overwrite: bool) -> int:
    """The checks before any data is read, the run directory, the shard file, then the run; returns its exit code."""
    from .data.partition import node_ranges
    from .data.prepare import check_matches, check_preparable, prepare
    from .data.validate import RUN_LABELS, check_block_labels
    from .engine.check import check_user_code
    from .runtime.agree import on_every_rank, on_rank0
    from .runtime.rundir import clear_previous, open_run_dir

    def check_data() -> bool:
        """Cheap checks first (bad input fails in about a second, before torch is imported): the rank
        count, then an existing shard file's structure and test labels (once, on rank 0), or whether
        the one to be made can be; True when the file exists."""
        node_ranges(cfg.nodes, comm.size)
        exists = cfg.data_path.exists()
        if exists:
            check_matches(cfg, cfg.data_path, RUN_LABELS)
        else:  # the shard file is to be made: refuse what cannot be made before anything is written
            check_preparable(cfg)
        return exists

    def open_dir() -> Optional[tuple]:
        """Rank 0 locks and checks the run directory, then the shard file is made, all before the run
        directory holds anything but its lock."""
        resumed = open_run_dir(run_dir, cfg, resume, overwrite)
        if not cfg.data_path.exists():
            prepare(cfg)
        if not resume:
            clear_previous(run_dir)
        return resumed

    with agreed(comm):  # an imported model or loss is tried on every rank before any data is read
        check_user_code(cfg)
    if comm.bcast(on_rank0(comm, check_data)):  # each rank its own nodes' labels: nobody reads all of them
        on_every_rank(comm, lambda: check_block_labels(cfg.data_path, comm.size, comm.rank))
    resumed = shared_checkpoint(comm, on_rank0(comm, open_dir))  # the other ranks learn rank 0's verdict
    from .rounds import run as run_rounds

    return run_rounds(cfg, run_dir, comm, resumed)


def shared_checkpoint(comm, resumed: Optional[tuple]) -> Optional[tuple]:
    """Rank 0's checkpoint folder and meta.json on every rank (the metrics rows stay on rank 0)."""
    slim = None if resumed is None else (resumed[0], {k: v for k, v in resumed[1].items() if k != "metrics"})
    slim = comm.bcast(slim)
    return resumed if comm.rank == 0 else slim


def _read_rows(run_dir: Path) -> list[dict]:
    import json

    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
