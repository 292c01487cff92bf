"""`fedmpi prepare --describe` and the report's node table: a shard file's attributes and its nodes.

Bounded whatever the file holds: a long table shows its first and last EDGE_ROWS nodes and a summary,
and many classes become each node's most frequent labels instead of a column per label.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .files import clip
from .shards import read_client_ids, read_offsets
from .validate import histogram_fits, label_counts, validate_shards

EDGE_ROWS = 10          # nodes shown at each end of a long table
MAX_LABEL_COLUMNS = 20  # more classes: each node's most frequent labels instead of a column each
TOP_LABELS = 3
ID_WIDTH = 24           # client ids are cut to this in the table


def describe(path: Path) -> str:
    """The file's attributes, then its nodes: samples, local test split, client id and label counts."""
    attrs = validate_shards(path)
    lines = [f"{k}: {clip(str(v))}" for k, v in sorted(attrs.items())]
    return "\n".join(lines + [""] + node_lines(path, attrs))


def node_lines(path: Path, attrs: dict) -> list[str]:
    """The node table of a validated file: without label counts when nodes x classes is too large for them."""
    ids, local = read_client_ids(path), np.diff(read_offsets(path, "local_test"))
    if histogram_fits(attrs):
        return label_table(label_counts(path, attrs), ids, local)
    note = f"(no label counts: {attrs['num_nodes']:,} nodes x {attrs['classes']:,} classes is too large to print)"
    return [note, *label_table(None, ids, local, sizes=np.diff(read_offsets(path, "train")))]


def label_table(counts: Optional[np.ndarray], ids: Optional[list[str]] = None, local: Optional[np.ndarray] = None,
                sizes: Optional[np.ndarray] = None) -> list[str]:
    """Per-node label histograms ([nodes, classes] counts; None: only `sizes`) as text rows, and a summary."""
    sizes = counts.sum(1) if counts is not None else sizes
    nodes, classes = len(sizes), (counts.shape[1] if counts is not None else 0)
    wide = classes <= MAX_LABEL_COLUMNS
    width = max(5, len(str(counts.max(initial=0))) + 1) if counts is not None else 0
    id_width = max([9] + [len(clip(c, ID_WIDTH)) for c in ids or []]) if ids is not None else 0
    head = (f"{'node':>5}" + (f" {'client_id':<{id_width}}" if ids is not None else "") + f" {'samples':>8}"
            + (f" {'local_test':>10}" if local is not None else "")
            + ("".join(f"{c:>{width}}" for c in range(classes)) if wide else "  labels (most frequent first)"))

    def row(n: int) -> str:
        labels = "" if counts is None else (
            "".join(f"{v:>{width}}" for v in counts[n]) if wide else "  " + top_labels(counts[n]))
        return (f"{n:>5}" + (f" {clip(ids[n], ID_WIDTH):<{id_width}}" if ids is not None else "")
                + f" {sizes[n]:>8}" + (f" {local[n]:>10}" if local is not None else "") + labels)

    if nodes <= 2 * EDGE_ROWS + 1:
        rows = [row(n) for n in range(nodes)]
    else:
        rows = ([row(n) for n in range(EDGE_ROWS)] + [f"  ... ({nodes - 2 * EDGE_ROWS:,} nodes not shown)"]
                + [row(n) for n in range(nodes - EDGE_ROWS, nodes)])
    what = f"columns: labels 0..{classes - 1}" if wide else f"{classes:,} classes: label x count"
    extra = [] if local is None else [f"local test examples per node: min {local.min()}, mean {local.mean():.1f}, "
                                      f"max {local.max()}; nodes without any: {int((local == 0).sum()):,}"]
    summary = f"samples per node: min {sizes.min()}, mean {sizes.mean():.1f}, max {sizes.max()}"
    if counts is None:
        return ["training samples per node", head, *rows, *extra, summary]
    kinds = (counts > 0).sum(1)
    summary += f"; labels per node: min {kinds.min()}, mean {kinds.mean():.2f}, max {kinds.max()}"
    return [f"training label counts per node ({what})", head, *rows, *extra, summary]


def top_labels(row: np.ndarray) -> str:
    """'3x41 7x20 1x18 (12 labels)': a node's most frequent labels and how many it has."""
    order = np.argsort(-row, kind="stable")[:TOP_LABELS]
    shown = " ".join(f"{c}x{row[c]}" for c in order if row[c])
    return f"{shown} ({int((row > 0).sum())} labels)"
