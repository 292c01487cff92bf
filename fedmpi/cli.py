"""The `fedmpi` command: parse, build, run, close. Bad input ends every rank with one line and exit 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .config import load_config, parse_overrides
from .data.importing import add_parser as add_import_parser
from .data.importing import cmd_import
from .errors import ConfigError, FedmpiError
from .runtime.comm import fail_job, install_excepthook, world


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line through fail_job, not a usage wall per rank
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedmpi", description="Federated averaging as an MPI job.")
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

    if comm.rank == 0:
        path = prepare(cfg, force=args.force)
        print(f"shard file: {path}")
        if args.describe:
            print(describe(path))
    comm.barrier()


def cmd_run(cfg, args, comm) -> None:
    from .data.partition import node_ranges
    from .data.prepare import prepare

    stem = Path(args.config).stem if args.config else "default"
    run_dir = Path(args.resume or args.out or f"runs/{stem}")
    # Cheap checks first: bad input fails in about a second, before torch is even imported.
    node_ranges(cfg.nodes, comm.size)
    if comm.rank == 0:
        check_run_dir(run_dir, args.resume is not None)
        prepare(cfg)  # the shard file whole, or refused, before the run directory holds anything
    from .run import run

    code = run(cfg, run_dir, comm, resume=args.resume is not None)
    if comm.rank == 0 and code == 0:
        print(f"run directory: {run_dir}")
    if code:
        sys.exit(code)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """The run directory must be writable and must not hold an unfinished run (unless resuming it)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write-test").touch()
        (run_dir / ".write-test").unlink()
    except OSError as err:
        raise ConfigError(f"--out {run_dir}: cannot write there ({err.strerror})") from None
    unfinished = (run_dir / "checkpoint" / "meta.json").exists() and not (run_dir / "model.pt").exists()
    if not resume and unfinished:
        raise ConfigError(f"--out {run_dir} holds a checkpoint of an unfinished run: continue it with "
                          f"--resume {run_dir}, or choose another --out")


def resume_config(args) -> Optional[str]:
    """--resume RUN_DIR reads RUN_DIR/config.yaml; --config and --out may not point elsewhere."""
    if getattr(args, "resume", None) is None:
        return args.config
    if args.config or args.out:
        raise ConfigError("--resume RUN_DIR takes the run's own config.yaml: drop --config and --out")
    path = Path(args.resume) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {args.resume}: no config.yaml there (not a fedmpi run directory)")
    return str(path)


def cmd_report(args, comm) -> None:
    from .output.report import report

    if comm.rank == 0:  # a plain command; under mpirun the other ranks have nothing to do
        print(f"report: {report(args.run_dirs, args.out) / 'report.md'}")


COMMANDS = {"prepare": cmd_prepare, "run": cmd_run}


def main(argv: Optional[list[str]] = None) -> None:
    comm = world()
    install_excepthook()
    try:
        args = build_parser().parse_args(argv)
        if args.command in ("report", "import"):  # read run directories or source files, no config
            (cmd_report if args.command == "report" else cmd_import)(args, comm)
            return
        overrides = parse_overrides(args.set)
        if args.data_dir is not None:
            overrides["data_dir"] = args.data_dir
        cfg = load_config(resume_config(args), overrides)
        COMMANDS[args.command](cfg, args, comm)
    except FedmpiError as err:
        fail_job(str(err), err.exit_code)
