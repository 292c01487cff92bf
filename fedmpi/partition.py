"""Split sample indices over nodes. Pure functions of (labels, sizes, seed): no I/O, no MPI.

Each returns a list with one index array per node. Non-IID schemes (shards, Dirichlet) are
added here as further functions registered in PARTITIONERS.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import ConfigError


def balanced(labels: np.ndarray, nodes: int, per_node: int, classes: int, seed: int,
             allow_reuse: bool = False) -> list[np.ndarray]:
    """The tutorial's IID split: every node gets per_node/classes samples of each label.

    Per label, that label's indices are shuffled with the seed and dealt out in node order.
    With allow_reuse (local test splits only), a label with too few samples is dealt
    cyclically, so splits of different nodes may share a few images.
    """
    if per_node % classes:
        raise ConfigError(f"partition 'balanced' needs samples per node ({per_node}) divisible by classes ({classes})")
    per_label = per_node // classes
    rng = np.random.default_rng([seed, 1])
    parts = []
    for label in range(classes):
        idx = np.flatnonzero(labels == label)
        need = nodes * per_label
        if len(idx) < need and not allow_reuse:
            raise ConfigError(f"partition 'balanced': label {label} has {len(idx)} samples, "
                              f"{nodes} nodes x {per_label} need {need}")
        if len(idx) == 0 and need:
            raise ConfigError(f"partition 'balanced': label {label} has no samples")
        idx = rng.permutation(idx)
        idx = np.resize(idx, need)  # np.resize repeats cyclically when need > len(idx)
        parts.append(idx.reshape(nodes, per_label))
    return [np.concatenate([p[node] for p in parts]) for node in range(nodes)]


def iid(labels: np.ndarray, nodes: int, per_node: int, classes: int, seed: int,
        allow_reuse: bool = False) -> list[np.ndarray]:
    """A uniformly random split into equal parts, labels ignored."""
    need = nodes * per_node
    if need > len(labels) and not allow_reuse:
        raise ConfigError(f"partition 'iid': {nodes} nodes x {per_node} samples need {need}, dataset has {len(labels)}")
    if need and len(labels) == 0:  # np.resize would invent index 0 out of an empty dataset
        raise ConfigError(f"partition 'iid': {nodes} nodes x {per_node} samples need {need}, dataset is empty")
    rng = np.random.default_rng([seed, 2])
    idx = np.resize(rng.permutation(len(labels)), need)
    return list(idx.reshape(nodes, per_node))


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {"balanced": balanced, "iid": iid}


def offsets_of(parts: list[np.ndarray]) -> np.ndarray:
    """Row offsets of node-contiguous shards: node i owns rows offsets[i]:offsets[i+1]."""
    return np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)


def node_ranges(nodes: int, ranks: int) -> list[range]:
    """Contiguous blocks of nodes per rank, sizes differing by at most one (lower ranks larger)."""
    if ranks > nodes:
        raise ConfigError(f"{ranks} MPI ranks but only {nodes} nodes: use at most {nodes} ranks (mpirun -n)")
    base, extra = divmod(nodes, ranks)
    starts = [r * base + min(r, extra) for r in range(ranks + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(ranks)]
