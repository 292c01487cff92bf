"""The `fedmpi` command: parse, build, run, close. Bad input ends every rank with one line and exit 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from . import __version__
from .config import load_config, parse_overrides
from .data.importing import add_parser as add_import_parser
from .data.importing import cmd_import
from .errors import ConfigError, FedmpiError
from .runtime.comm import agreed, fail_job, install_excepthook, world


class _ParserExit(FedmpiError):
    """--help or --version was given: end with their exit code (0) and no error line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line through fail_job, not a usage wall per rank
        raise ConfigError(f"{message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:
        # Through the agreement like an error: a rank must not leave while the others wait for it.
        if message:
            self._print_message(message, sys.stderr)
        err = _ParserExit("")
        err.exit_code = status
        raise err

    def _print_message(self, message: str, file=None) -> None:  # noqa: ANN001 - argparse's signature
        if world().rank == 0:  # --help and --version: once, not once per rank
            super()._print_message(message, file)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedmpi", description="Federated averaging as an MPI job.")
    parser.add_argument("--version", action="version", version=f"fedmpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in (("prepare", "write the HDF5 shard file of a config"),
                       ("run", "run FedAvg (under mpirun/srun for several ranks)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", help="YAML run config (e.g. jobs/mnist_iid.yaml); defaults when omitted")
        p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", action="extend",
                       help="override config keys, several after one --set")
        p.add_argument("--data-dir", help="where the raw dataset lies (same as --set data_dir=DIR)")
    prep = sub.choices["prepare"]
    prep.add_argument("--force", action="store_true", help="rewrite the shard file even when it exists")
    prep.add_argument("--describe", action="store_true", help="print the shard file's attributes")
    sub.choices["run"].add_argument("--out", help="run directory (default runs/<config name>)")
    sub.choices["run"].add_argument("--overwrite", action="store_true",
                                    help="replace the run --out already holds (finished or not) instead of refusing")
    sub.choices["run"].add_argument("--resume", metavar="RUN_DIR",
                                    help="continue the run in RUN_DIR from its checkpoint (its config.yaml; --set may "
                                         "change rounds, eval_every, device, threads, engine, checkpoint_every)")
    rep = sub.add_parser("report", help="tables and plots of run directories",
                         description="report.md and accuracy/time/bytes PNGs of one or more run directories")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (several: side by side)")
    rep.add_argument("--out", help="output directory (default: the run directory, or runs/report for several)")
    add_import_parser(sub)
    return parser


def cmd_prepare(cfg, args, comm) -> None:
    from .data.prepare import describe, prepare

    with agreed(comm):  # rank 0's error, if any, ends every rank cleanly (the others wait here)
        if comm.rank == 0:
            path = prepare(cfg, force=args.force)
            print(f"shard file: {path}")
            if args.describe:
                print(describe(path))


def cmd_run(cfg, args, comm) -> None:
    from .data.partition import node_ranges
    from .data.prepare import check_matches, check_preparable, prepare
    from .data.validate import RUN_LABELS, check_block_labels
    from .runtime.agree import on_every_rank, on_rank0
    from .runtime.rundir import clear_previous, open_run_dir

    stem = Path(args.config).stem if args.config else "default"
    run_dir = Path(args.resume or args.out or f"runs/{stem}")
    resume = args.resume is not None

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
        resumed = open_run_dir(run_dir, cfg, resume, args.overwrite)
        if not cfg.data_path.exists():
            prepare(cfg)
        if not resume:
            clear_previous(run_dir)
        return resumed

    if comm.bcast(on_rank0(comm, check_data)):  # each rank its own nodes' labels: nobody reads all of them
        on_every_rank(comm, lambda: check_block_labels(cfg.data_path, comm.size, comm.rank))
    # The other ranks learn rank 0's verdict and its checkpoint.
    resumed = shared_checkpoint(comm, on_rank0(comm, open_dir))
    from .run import run

    code = run(cfg, run_dir, comm, resumed)
    if comm.rank == 0 and code == 0:
        print(f"run directory: {run_dir}")
    if code:
        sys.exit(code)


def shared_checkpoint(comm, resumed: Optional[tuple]) -> Optional[tuple]:
    """Rank 0's checkpoint folder and meta.json on every rank (the metrics rows stay on rank 0)."""
    slim = None if resumed is None else (resumed[0], {k: v for k, v in resumed[1].items() if k != "metrics"})
    slim = comm.bcast(slim)
    return resumed if comm.rank == 0 else slim


def resume_config(args) -> Optional[str]:
    """--resume RUN_DIR reads RUN_DIR/config.yaml; --config, --out and --overwrite do not go with it."""
    if getattr(args, "resume", None) is None:
        return args.config
    if args.config or args.out or args.overwrite:
        raise ConfigError("--resume RUN_DIR continues the run there with its own config.yaml: "
                          "drop --config, --out and --overwrite")
    path = Path(args.resume) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {args.resume}: no config.yaml there (not a fedmpi run directory)")
    return str(path)


def cmd_report(args, comm) -> None:
    from .output.report import report

    with agreed(comm):  # a plain command; under mpirun the other ranks have nothing to do
        if comm.rank == 0:
            print(f"report: {report(args.run_dirs, args.out) / 'report.md'}")


COMMANDS = {"prepare": cmd_prepare, "run": cmd_run}


def read_command_line(argv: Optional[list[str]]) -> tuple:
    """The parsed arguments and the config (None for `report` and `import`); every rank reads the same files."""
    args = build_parser().parse_args(argv)
    if args.command in ("report", "import"):  # read run directories or source files, no config
        return args, None
    overrides = parse_overrides(args.set)
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    return args, load_config(resume_config(args), overrides)


def main(argv: Optional[list[str]] = None) -> None:
    """The `fedmpi` command on one rank: bad input ends every rank with one line and exit code 2.

    How a FedmpiError ends the job depends on where it was found (errors.FedmpiError.everywhere):
    out of an agreement point (`agreed`: every rank reports its outcome in one allgather), every rank
    holds the same error, so rank 0 prints it and all exit with its code, no MPI_Abort. Anywhere
    else a rank may have failed alone while the others wait for it: it prints and aborts the world.
    The command line and the config files are read inside such a point, so a typo, a bad value or
    an unreadable file on any rank ends the job cleanly, and never with one rank gone and the
    others waiting.
    """
    comm = world()
    install_excepthook()
    try:
        with agreed(comm):
            args, cfg = read_command_line(argv)
        if args.command in ("report", "import"):  # read run directories or source files, no config
            (cmd_report if args.command == "report" else cmd_import)(args, comm)
        else:
            COMMANDS[args.command](cfg, args, comm)
    except FedmpiError as err:
        fail_job(str(err), err.exit_code, err.everywhere, err.origin)
