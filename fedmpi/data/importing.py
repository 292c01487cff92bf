"""`fedmpi import tff|npz`: data users already have -> a shard file with one node per client.

Rank 0 converts (the other ranks of an mpirun only wait); bad flags are refused on every rank first.
The result runs with `dataset: file` and `data_file: FILE.h5` (userfile.py).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..errors import ConfigError, DataError
from .files import kind_of, reason

# Imported by cli.py for every command: h5py and the importers are loaded only when `import` runs.

TFF_HELP = "TensorFlow Federated / LEAF HDF5 client data: /examples/<client id>/<feature>"
NPZ_HELP = "an .npz of x, y, client_id (and optionally x_test, y_test, client_id_test)"


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    """Register `fedmpi import tff ...` and `fedmpi import npz ...` under the command's subparsers."""
    text = "convert federated data (one node per client) into a shard file for `dataset: file`"
    imp = sub.add_parser("import", help=text, description=text)
    kinds = imp.add_subparsers(dest="source", required=True, parser_class=type(imp))
    tff = kinds.add_parser("tff", help=TFF_HELP, description=TFF_HELP)
    tff.add_argument("train", metavar="TRAIN.h5", help="the clients' training examples")
    tff.add_argument("test", metavar="TEST.h5", help="the clients' test examples (local test splits, test set)")
    tff.add_argument("--x", default="pixels", help="the input feature (default: pixels)")
    tff.add_argument("--y", default="label", help="the label feature, integer class indices (default: label)")
    npz = kinds.add_parser("npz", help=NPZ_HELP, description=NPZ_HELP)
    npz.add_argument("arrays", metavar="ARRAYS.npz")
    npz.add_argument("--test-fraction", type=float, default=0.2,
                     help="without x_test: each client's share of local test examples, in [0, 1) (default 0.2)")
    npz.add_argument("--seed", type=int, default=0, help="seeds the --test-fraction split (default 0)")
    for p in (tff, npz):
        p.add_argument("--out", required=True, metavar="FILE.h5", help="the shard file to write")
        p.add_argument("--force", action="store_true", help="replace --out when it exists")
        p.add_argument("--classes", type=int, help="number of classes (default: the largest label + 1)")
        p.add_argument("--reshape", metavar="D1,D2,...", help="each sample's shape in the file, e.g. 1,28,28 for "
                                                                "the cnn model (same number of values)")
        p.add_argument("--channels-last", action="store_true",
                       help="samples are H,W,C (e.g. TFF's CIFAR-100): store them C,H,W")
        p.add_argument("--pixel-scale", type=float,
                       help="model input = x * this (default 1/255 for uint8 inputs, 1.0 otherwise)")


def options(args: argparse.Namespace):  # noqa: ANN201 - natural.Options, imported late
    """The command line as natural.Options; a bad value is a ConfigError naming the flag."""
    from .natural import Options
    from .validate import MAX_CLASSES

    if args.classes is not None and not 1 <= args.classes <= MAX_CLASSES:
        raise ConfigError(f"--classes must be in [1, {MAX_CLASSES:,}], got {args.classes}")
    if args.pixel_scale is not None and not (math.isfinite(args.pixel_scale) and args.pixel_scale > 0):
        raise ConfigError(f"--pixel-scale must be a positive number, got {args.pixel_scale}")
    fraction, seed = getattr(args, "test_fraction", 0.2), getattr(args, "seed", 0)
    if not 0 <= fraction < 1:  # also refuses NaN
        raise ConfigError(f"--test-fraction must be in [0, 1), got {fraction}")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    return Options(Path(args.out), args.classes, parse_shape(args.reshape), args.channels_last, args.pixel_scale,
                   seed, fraction)


def parse_shape(text: str | None) -> tuple | None:
    """'1,28,28' -> (1, 28, 28)."""
    from .validate import MAX_INPUT_DIMS, MAX_SAMPLE_VALUES

    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not 1 <= len(shape) <= MAX_INPUT_DIMS or min(shape) < 1 or math.prod(shape) > MAX_SAMPLE_VALUES:
        raise ConfigError(f"--reshape expects 1 to {MAX_INPUT_DIMS} positive integers separated by commas, "
                          f"got {text[:80]!r}")
    return shape


def check_out(out: Path, force: bool, sources: list[Path]) -> None:
    """--out may be replaced only with --force, must be a regular file if it exists, and no source."""
    try:
        st = os.stat(out)
    except (FileNotFoundError, NotADirectoryError):  # writing will say why it cannot create it
        return
    except OSError as err:
        raise DataError(f"--out {out} cannot be checked ({reason(err)})") from None
    if not os.path.isfile(out):
        raise DataError(f"--out {out} is {kind_of(st.st_mode)}, not a regular file")
    for source in sources:
        if os.path.exists(source) and os.path.samefile(source, out):
            raise DataError(f"--out {out} is the source file {source}; choose another name")
    if not force:
        raise DataError(f"--out {out} exists; pass --force to replace it")


def cmd_import(args: argparse.Namespace, comm) -> None:  # noqa: ANN001 - a runtime.comm communicator
    """Rank 0 writes the shard file and prints a summary; every rank leaves together (one agreement)."""
    from ..runtime.comm import agreed

    opts = options(args)
    with agreed(comm):  # rank 0's refusal ends every rank cleanly with its one line
        if comm.rank == 0:
            from .shards import read_attrs

            if args.source == "tff":
                from .tff import import_tff

                check_out(opts.out, args.force, [Path(args.train), Path(args.test)])
                path = import_tff(Path(args.train), Path(args.test), args.x, args.y, opts)
            else:
                from .npz import import_npz

                check_out(opts.out, args.force, [Path(args.arrays)])
                path = import_npz(Path(args.arrays), opts)
            attrs = read_attrs(path)
            print(f"shard file: {path} ({attrs['num_nodes']:,} nodes, {attrs['classes']} classes, inputs "
                  f"{attrs['input_shape']}); run it with dataset: file, data_file: {path}")
