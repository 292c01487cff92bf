"""`fedmpi import npz ARRAYS.npz`: per-example arrays with a client id each -> a shard file, one node per client.

Arrays: `x` [n, ...] inputs, `y` [n] integer labels, `client_id` [n] integers or strings, and optionally
`x_test`, `y_test`, `client_id_test`: each client's own test examples (a client only there has no
node; its examples join the test set only). Without them, each client's local test split is a seeded
random `--test-fraction` of its examples (one example at least stays for training). Clients are
taken in sorted id order: numbers numerically, strings by code point. The test set is the union of
the local test splits (and of the test-only clients' examples).

Memory: the labels, the client ids and the bookkeeping of where each example goes are held whole
(about 60 bytes an example plus its id); the inputs are read once, a slice at a time (npyzip.py),
each row written straight to its place in the shard file (writer.py).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .files import quote
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
from .npyzip import WHAT, Member, member, members, open_npz
from .shards import available_memory
from .writer import Layout, ShardWriter

TRAIN, LOCAL, ONLY_TEST = 0, 1, 2   # where an example goes: /train, /local_test (and /test), /test only
SPLIT_STREAM = 0x5E1EC7             # the random stream of the per-client test split
BOOKKEEPING = 60                    # bytes held per example besides its id (labels, indices, positions)


@dataclass
class Part:
    """x (streamed), y and the client ids (whole) of the train arrays or of the *_test arrays."""

    x: Member
    y: np.ndarray
    ids: np.ndarray
    ids_where: str  # the client_id array, for messages


@dataclass
class Plan:
    """Where each example of a part goes (group and row in it), and the row counts that follow."""

    group: list          # per part: int8 [n], TRAIN / LOCAL / ONLY_TEST
    pos: list            # per part: int64 [n], row in its group (ONLY_TEST rows: after the local ones)
    train_counts: np.ndarray
    local_counts: np.ndarray
    only_test: int


def load_part(path: Path, zf: zipfile.ZipFile, entries: dict, suffix: str, opts: Options,
              spec: InputSpec | None) -> tuple[Part, InputSpec]:
    """Check the headers of x, y, client_id (with `suffix`), then read y and client_id whole."""
    x, y, ids = (member(path, zf, entries[f"{name}{suffix}"]) for name in ("x", "y", "client_id"))
    if len(x.shape) < 2 or x.shape[0] == 0:
        raise DataError(f"{x.where} has shape {list(x.shape)}; expected [examples, ...] with one example or more")
    if spec is None:
        spec = input_spec(x.dtype, x.shape[1:], opts, x.where)
    same_inputs(spec, x.dtype, x.shape[1:], x.where, "x")
    n = x.shape[0]
    check_label_dtype(y.dtype, y.where)
    if y.shape not in ((n,), (n, 1)):
        raise DataError(f"{y.where} has shape {list(y.shape)}, x{suffix} has {n:,} rows: expected [{n}]")
    if ids.dtype.kind not in "iuUS" or ids.shape != (n,):
        raise DataError(f"{ids.where} is {ids.dtype} {list(ids.shape)}; expected [{n}] integers or strings, one "
                        f"client id per row of x{suffix}")
    check_memory(path, n * (BOOKKEEPING + ids.dtype.itemsize))
    labels = y.read_all(zf).reshape(-1)
    label_max(labels, y.where, 0)
    return Part(x, labels.astype(np.int64), ids.read_all(zf), ids.where), spec


def check_memory(path: Path, need: int) -> None:
    free = available_memory()
    if free is not None and need > free:
        raise DataError(f"{WHAT} {path}: its labels and client ids need about {need / 2**30:.1f} GiB of memory, "
                        f"only {free / 2**30:.1f} GiB is available")


def clients(part: Part) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(sorted unique raw ids, each row's index into them, the ids as text), every id checked."""
    unique, inverse = np.unique(part.ids, return_inverse=True)
    return unique, inverse.reshape(-1), [client_id(raw.item(), part.ids_where) for raw in unique]


def positions(group: np.ndarray, order_key: np.ndarray) -> np.ndarray:
    """Each example's row in its group: by order_key (a client index), source order within a client."""
    pos = np.empty(len(group), np.int64)
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        rows = rows[np.argsort(order_key[rows], kind="stable")]
        pos[rows] = np.arange(len(rows))
    return pos


def plan_split(inverse: np.ndarray, nodes: int, opts: Options) -> Plan:
    """Without *_test arrays: a seeded random test_fraction of each client's examples is its local test split."""
    counts = np.bincount(inverse, minlength=nodes)
    take = np.minimum(np.floor(opts.test_fraction * counts + 0.5).astype(np.int64), counts - 1)
    keys = np.random.default_rng([opts.seed, SPLIT_STREAM]).random(len(inverse))
    order = np.lexsort((keys, inverse))  # by client, in random order within each
    rank = np.empty(len(inverse), np.int64)
    rank[order] = np.arange(len(inverse)) - np.r_[0, np.cumsum(counts)[:-1]][inverse[order]]
    group = np.where(rank < take[inverse], LOCAL, TRAIN).astype(np.int8)
    return Plan([group], [positions(group, inverse)], counts - take, take, 0)


def plan_given(inverse: np.ndarray, nodes: int, test_node: np.ndarray, test_inverse: np.ndarray) -> Plan:
    """With *_test arrays: each client's test rows are its local split; test-only clients' rows go last."""
    node = test_node[test_inverse]
    group = np.where(node >= 0, LOCAL, ONLY_TEST).astype(np.int8)
    key = np.where(node >= 0, node, nodes + test_inverse)  # test-only clients after all nodes, in id order
    train = np.zeros(len(inverse), np.int8)
    local = np.bincount(node[node >= 0], minlength=nodes)
    return Plan([train, group], [positions(train, inverse), positions(group, key)],
                np.bincount(inverse, minlength=nodes), local, int((group == ONLY_TEST).sum()))


def import_npz(path: Path, opts: Options) -> Path:
    """Write opts.out from an .npz file; returns its path."""
    with open_npz(path) as zf:
        entries = members(path, zf)
        for name in ("x", "y", "client_id"):
            if name not in entries:
                has = ", ".join(sorted(quote(k) for k in entries)[:8]) or "no arrays"
                raise DataError(f"{WHAT} {path} has no array '{name}' (it has: {has})")
        given = sorted(name for name in ("x_test", "y_test", "client_id_test") if name in entries)
        if 0 < len(given) < 3:
            missing = sorted({"x_test", "y_test", "client_id_test"} - set(given))
            raise DataError(f"{WHAT} {path} has {', '.join(given)} but not {', '.join(missing)}: give all three "
                            f"or none (then --test-fraction splits each client)")
        train, spec = load_part(path, zf, entries, "", opts, None)
        unique, inverse, ids = clients(train)
        check_counts(len(ids), len(inverse), f"{WHAT} {path}")
        parts, plan = [train], None
        if given:
            test, _ = load_part(path, zf, entries, "_test", opts, spec)
            plan = plan_with_test(path, unique, inverse, ids, test)
            parts.append(test)
        else:
            plan = plan_split(inverse, len(ids), opts)
            if plan.local_counts.sum() == 0:
                raise DataError(f"{WHAT} {path}: --test-fraction {opts.test_fraction} leaves no test examples "
                                f"(give x_test, y_test, client_id_test, or a larger fraction)")
        write_npz(zf, parts, plan, ids, spec, opts, path)
    return opts.out


def plan_with_test(path: Path, unique: np.ndarray, inverse: np.ndarray, ids: list[str], test: Part) -> Plan:
    """Match the test rows' clients to the training clients (by id), with notes on those in one part only."""
    if (unique.dtype.kind in "iu") != (test.ids.dtype.kind in "iu") or (unique.dtype.kind == "S") != (
            test.ids.dtype.kind == "S"):
        raise DataError(f"{WHAT} {path}: client_id_test is {test.ids.dtype}, client_id is {unique.dtype}: the same "
                        f"kind of ids (integers, str or bytes) in both")
    t_unique, t_inverse, t_ids = clients(test)
    at = np.minimum(np.searchsorted(unique, t_unique), len(unique) - 1)
    test_node = np.where(unique[at] == t_unique, at, -1)
    plan = plan_given(inverse, len(unique), test_node, t_inverse)
    if (test_node < 0).any():
        first = t_ids[int(np.flatnonzero(test_node < 0)[0])]
        note(f"clients of client_id_test not in client_id: {int((test_node < 0).sum()):,} (first: {quote(first)}); "
             f"their {plan.only_test:,} examples join the test set only")
    if (plan.local_counts == 0).any():
        first = ids[int(np.flatnonzero(plan.local_counts == 0)[0])]
        note(f"clients without test examples: {int((plan.local_counts == 0).sum()):,} of {len(ids):,} (first: "
             f"{quote(first)}); their local test splits are empty")
    return plan


def write_npz(zf: zipfile.ZipFile, parts: list[Part], plan: Plan, ids: list[str], spec: InputSpec,
              opts: Options, path: Path) -> None:
    """Lay out the shard file, write labels, offsets and ids, then stream each part's x to its rows."""
    local = int(plan.local_counts.sum())
    rows = dict(train=int(plan.train_counts.sum()), local_test=local, test=local + plan.only_test)
    layout = Layout(len(ids), rows, spec.out_shape, spec.out_dtype, max(len(c.encode()) for c in ids))
    top = max(int(part.y.max()) for part in parts)
    classes = classes_of(top, opts, f"{WHAT} {path}")
    attrs = natural_attrs("npz", [path], len(ids), classes, spec, opts, "client" if len(parts) == 2 else "split")
    with ShardWriter(opts.out, layout, attrs) as writer:
        labels = {name: np.zeros(n, "<i8") for name, n in rows.items()}
        for part, group, pos in zip(parts, plan.group, plan.pos):
            for g, names in ((TRAIN, ["train"]), (LOCAL, ["local_test", "test"]), (ONLY_TEST, ["test"])):
                sel = group == g
                for name in names:
                    labels[name][pos[sel] + (local if g == ONLY_TEST else 0)] = part.y[sel]
        for name, values in labels.items():
            writer.write(f"{name}/y", 0, values)
        writer.write("train/offsets", 0, np.r_[0, np.cumsum(plan.train_counts)].astype("<i8"))
        writer.write("local_test/offsets", 0, np.r_[0, np.cumsum(plan.local_counts)].astype("<i8"))
        writer.write("train/client_ids", 0, np.array([c.encode() for c in ids], dtype=f"S{layout.id_bytes}"))
        progress = Progress(sum(part.x.shape[0] for part in parts))
        for part, group, pos in zip(parts, plan.group, plan.pos):
            stream_x(zf, part, group, pos, local, spec, writer, progress)
        writer.commit()


def stream_x(zf: zipfile.ZipFile, part: Part, group: np.ndarray, pos: np.ndarray, local: int, spec: InputSpec,
             writer: ShardWriter, progress: Progress) -> None:
    """Read x a slice at a time; write each converted row to its place (runs of consecutive rows at once)."""
    for start, chunk in part.x.rows(zf, spec.rows_per_step()):
        rows = spec.convert(chunk, part.x.where, start)
        g, p = group[start:start + len(rows)], pos[start:start + len(rows)]
        for value, names in ((TRAIN, ["train"]), (LOCAL, ["local_test", "test"]), (ONLY_TEST, ["test"])):
            sel = np.flatnonzero(g == value)
            if len(sel) == 0:
                continue
            sel = sel[np.argsort(p[sel], kind="stable")]
            for name in names:
                writer.write_rows(f"{name}/x", p[sel] + (local if value == ONLY_TEST else 0), rows[sel])
        progress.advance(len(rows))
