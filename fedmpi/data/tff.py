"""`fedmpi import tff TRAIN.h5 TEST.h5`: TensorFlow Federated's HDF5 client data -> a shard file.

TFF's layout (tff.simulation.datasets.HDF5ClientData; the files of emnist, cifar100, shakespeare,
stackoverflow): `/examples/<client id>/<feature>`, one group per client, one dataset per feature whose
first axis is the client's examples (FEMNIST: `pixels` float32 [n, 28, 28], `label` int32 [n]).
Clients are taken in sorted id order (TFF sorts its client_ids the same way), one node each; each
client's examples in TEST become its local test split, and the test set is all of TEST's examples.
A client only in TEST has no node: its examples join the test set only (a note says how many).

The source is read in two passes, client by client: sizes, dtypes and labels first (nothing else
is read), then the inputs, a bounded slice at a time, streamed into the shard file (writer.py). Only
what is used is touched, and each of it is checked first: /examples and every client group and
feature must be hard links in the file, each dataset wholly stored in it (h5check.check_storage).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError
from .files import clip, quote, reason, stat_regular
from .h5check import READ_ERRORS, check_storage, read_rows
from .natural import (
    InputSpec,
    Options,
    Progress,
    check_counts,
    check_label_dtype,
    classes_of,
    client_id,
    input_spec,
    label_max,
    natural_attrs,
    note,
    same_inputs,
)
from .writer import Layout, ShardWriter

WHAT = "TFF file"
LABEL_STEP = 1 << 20  # labels read per step in the first pass


@dataclass
class Client:
    id: str
    name: bytes   # its link name in /examples
    rows: int


@dataclass
class Source:
    """One TFF file after the first pass: its clients in id order, what their inputs are, their largest label."""

    path: Path
    f: h5py.File
    clients: dict
    spec: InputSpec
    max_label: int


def open_source(path: Path) -> h5py.File:
    """The file opened read-only, after checking that it is a regular file."""
    stat_regular(path, WHAT)
    try:
        return h5py.File(path, "r", locking=False)
    except READ_ERRORS as err:
        raise DataError(f"{WHAT} {path} is not a readable HDF5 file: {reason(err)}") from None


def hard_link(path: Path, group: h5py.Group, name: bytes, where: str, kind: int) -> None:
    """`name` in `group` is a hard link to an object of `kind` (a group or a dataset)."""
    if not group.id.links.exists(name):
        raise DataError(f"{where} is missing")
    link = group.id.links.get_info(name).type
    if link != h5py.h5l.TYPE_HARD:
        words = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}
        raise DataError(f"{where} is {words.get(link, 'a user-defined link')}; fedmpi reads only data stored "
                        f"in the file itself")
    if h5py.h5o.get_info(group.id, name).type != kind:
        raise DataError(f"{where} is not a {'group' if kind == h5py.h5o.TYPE_GROUP else 'dataset'}")


def client_names(path: Path, f: h5py.File) -> list[tuple[str, bytes]]:
    """(id, link name) of every client in /examples, sorted by id; each name checked."""
    where = f"{WHAT} {path}: /examples"
    try:
        hard_link(path, f, b"examples", where, h5py.h5o.TYPE_GROUP)
    except DataError as err:
        if "missing" in str(err):
            raise DataError(f"{where} is missing: a TFF file holds /examples/<client id>/<feature>") from None
        raise
    group = f["examples"]
    check_counts(group.id.get_num_objs(), 0, f"{WHAT} {path}")
    names = []
    group.id.links.iterate(lambda name: names.append(name))
    out = sorted((client_id(name, where), name) for name in names)
    if not out:
        raise DataError(f"{where} holds no clients")
    return out


def feature(path: Path, f: h5py.File, client: Client, name: str) -> h5py.Dataset:
    """The dataset examples/<client>/<name>, checked to be stored wholly in the file."""
    where = f"{WHAT} {path}: client {quote(client.id)}"
    group = f["examples"]
    hard_link(path, group, client.name, where, h5py.h5o.TYPE_GROUP)
    cgroup = group[client.name]
    try:
        hard_link(path, cgroup, name.encode(), f"{where}: feature '{clip(name)}'", h5py.h5o.TYPE_DATASET)
    except DataError as err:
        if "missing" not in str(err):
            raise
        has = ", ".join(sorted(clip(k, 40) for k in islice(cgroup, 8)))  # a few: a hostile group may hold millions
        raise DataError(f"{where}: feature '{clip(name)}' is missing (the client has: {has or 'nothing'})") from None
    dset = cgroup[name]
    check_storage(path, f"examples/{client.id}/{name}", dset, f.id.get_filesize(), WHAT)
    if dset.ndim == 0:
        raise DataError(f"{where}: feature '{clip(name)}' is a scalar, expected one row per example")
    return dset


def scan(path: Path, f: h5py.File, xname: str, yname: str, opts: Options, spec: InputSpec | None = None,
         first: str = "") -> Source:
    """First pass: every client's row count, inputs' dtype and shape, and labels (checked); no inputs read.

    `spec` and `first` (where it was seen) come from the train file when this is the test file.
    """
    clients, top = {}, -1
    for cid, name in client_names(path, f):
        client = Client(cid, name, 0)
        where = f"{WHAT} {path}: client {quote(cid)}"
        try:
            x, y = feature(path, f, client, xname), feature(path, f, client, yname)
            if spec is None:
                spec = input_spec(x.dtype, x.shape[1:], opts, f"{where}: feature '{xname}'")
                first = f"client {quote(cid)}"
            same_inputs(spec, x.dtype, x.shape[1:], f"{where}: feature '{xname}'", first)
            check_label_dtype(y.dtype, f"{where}: feature '{yname}'")
            if y.shape not in ((x.shape[0],), (x.shape[0], 1)):
                raise DataError(f"{where}: feature '{yname}' has shape {list(y.shape)}, '{xname}' has {x.shape[0]:,} "
                                f"rows: expected [{x.shape[0]}]")
            client.rows = int(x.shape[0])
            for start in range(0, client.rows, LABEL_STEP):
                labels = read_rows(path, y, start, start + LABEL_STEP, WHAT).reshape(-1)
                top = max(top, label_max(labels, f"{where}: feature '{yname}'", start))
        except READ_ERRORS as err:
            raise DataError(f"{where}: cannot be read ({reason(err)})") from None
        clients[cid] = client
    check_counts(len(clients), sum(c.rows for c in clients.values()), f"{WHAT} {path}")
    return Source(path, f, clients, spec, top)


def copy_client(src: Source, client: Client, xname: str, yname: str, writer: ShardWriter,
                targets: list[tuple[str, int]], progress: Progress) -> None:
    """Second pass for one client: its rows, converted a slice at a time, to each (group, first row) target."""
    where = f"{WHAT} {src.path}: client {quote(client.id)}: feature '{xname}'"
    try:
        x, y = (feature(src.path, src.f, client, name) for name in (xname, yname))
        step = src.spec.rows_per_step()
        for a in range(0, client.rows, step):
            rows = src.spec.convert(read_rows(src.path, x, a, a + step, WHAT), where, a)
            labels = read_rows(src.path, y, a, a + step, WHAT).reshape(-1)
            label_max(labels, f"{WHAT} {src.path}: client {quote(client.id)}: feature '{yname}'", a)
            for group, base in targets:
                writer.write(f"{group}/x", base + a, rows)
                writer.write(f"{group}/y", base + a, labels.astype("<i8"))
            progress.advance(len(rows))
    except READ_ERRORS as err:
        raise DataError(f"{where}: cannot be read ({reason(err)})") from None


def import_tff(train: Path, test: Path, xname: str, yname: str, opts: Options) -> Path:
    """Write opts.out from a TFF train and test file; returns its path."""
    with open_source(train) as ftrain, open_source(test) as ftest:
        tr = scan(train, ftrain, xname, yname, opts, None)
        te = scan(test, ftest, xname, yname, opts, tr.spec, f"{train}'s clients")
        for cid, client in tr.clients.items():
            if client.rows == 0:
                raise DataError(f"{WHAT} {train}: client {quote(cid)} has no examples (every training client "
                                f"needs one)")
        ids = list(tr.clients)
        test_rows = np.array([te.clients[c].rows if c in te.clients else 0 for c in ids], np.int64)
        only_test = [c for c in te.clients if c not in tr.clients]
        tell_missing(train, test, ids, te.clients, only_test)
        layout = Layout(len(ids), dict(train=sum(c.rows for c in tr.clients.values()), local_test=int(test_rows.sum()),
                                       test=sum(c.rows for c in te.clients.values())),
                        tr.spec.out_shape, tr.spec.out_dtype, max(len(c.encode()) for c in ids))
        if layout.rows["test"] == 0:
            raise DataError(f"{WHAT} {test} holds no examples: the shard file needs a test set")
        classes = classes_of(max(tr.max_label, te.max_label), opts, f"{WHAT} {train} / {test}")
        attrs = natural_attrs("tff", [train, test], len(ids), classes, tr.spec, opts, "client")
        with ShardWriter(opts.out, layout, attrs) as writer:
            write_tff(writer, tr, te, ids, only_test, xname, yname)
            writer.commit()
    return opts.out


def write_tff(writer: ShardWriter, tr: Source, te: Source, ids: list[str], only_test: list[str],
              xname: str, yname: str) -> None:
    """Second pass: offsets and ids, then every client's train rows, test rows, and the test-only clients."""
    train_counts = np.array([tr.clients[c].rows for c in ids], np.int64)
    test_counts = np.array([te.clients[c].rows if c in te.clients else 0 for c in ids], np.int64)
    writer.write("train/offsets", 0, np.r_[0, np.cumsum(train_counts)].astype("<i8"))
    writer.write("local_test/offsets", 0, np.r_[0, np.cumsum(test_counts)].astype("<i8"))
    writer.write("train/client_ids", 0, np.array([c.encode() for c in ids], dtype=f"S{writer.layout.id_bytes}"))
    progress = Progress(writer.layout.rows["train"] + writer.layout.rows["test"])
    row = 0
    for cid in ids:
        copy_client(tr, tr.clients[cid], xname, yname, writer, [("train", row)], progress)
        row += tr.clients[cid].rows
    row = 0
    for cid in [c for c in ids if c in te.clients] + only_test:
        both = [("test", row)] + ([("local_test", row)] if cid in tr.clients else [])
        copy_client(te, te.clients[cid], xname, yname, writer, both, progress)
        row += te.clients[cid].rows


def tell_missing(train: Path, test: Path, ids: list[str], test_clients: dict, only_test: list[str]) -> None:
    """Notes on clients that are in one file only (never an error: TFF's own files may have them)."""
    absent = [c for c in ids if c not in test_clients or test_clients[c].rows == 0]
    if absent:
        note(f"clients without examples in {test}: {len(absent):,} of {len(ids):,} (first: {quote(absent[0])}); "
             f"their local test splits are empty")
    if only_test:
        rows = sum(test_clients[c].rows for c in only_test)
        note(f"clients of {test} not in {train}: {len(only_test):,} (first: {quote(only_test[0])}); their "
             f"{rows:,} examples join the test set only")
