"""Split sample indices over nodes. Pure functions of (labels, sizes, seed): no I/O, no MPI.

Each returns a list with one index array per node. IID: `balanced`, `iid`. Non-IID: `shards`
(McMahan et al. 2017), `dirichlet` (label skew), `quantity` (size skew). A partitioner's own
hyperparameters are keyword-only arguments after the common ones (see prepare.partition_options).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..errors import ConfigError


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


def _pool(labels: np.ndarray, need: int, rng: np.random.Generator, name: str, allow_reuse: bool) -> np.ndarray:
    """`need` distinct random sample indices (cyclic repeats only with allow_reuse)."""
    if need > len(labels) and not allow_reuse:
        raise ConfigError(f"partition '{name}': nodes x samples_per_node need {need} samples, "
                          f"dataset has {len(labels)}")
    return np.resize(rng.permutation(len(labels)), need)


def _split_by_sizes(idx: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(idx, np.cumsum(sizes)[:-1])


def _round_to_total(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to `shares` summing exactly to `total` (largest remainder)."""
    raw = shares / shares.sum() * total
    counts = np.floor(raw).astype(np.int64)
    short = total - counts.sum()
    counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts


def _check_enough(total: int, nodes: int, name: str) -> None:
    if total < nodes:
        raise ConfigError(f"partition '{name}': {total} samples cannot give each of {nodes} nodes one")


def _fill_empty(sizes: np.ndarray, name: str) -> np.ndarray:
    """Give every empty node one sample, taken from the currently largest node."""
    _check_enough(int(sizes.sum()), len(sizes), name)
    sizes = sizes.copy()
    for node in np.flatnonzero(sizes == 0):
        sizes[np.argmax(sizes)] -= 1
        sizes[node] = 1
    return sizes


def shards(labels: np.ndarray, nodes: int, per_node: int, classes: int, seed: int,
           allow_reuse: bool = False, *, shards_per_node: int = 2) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into equal shards, deal shards_per_node to each node.

    The samples (a random subset when the dataset is larger) are sorted by label, ties in a
    seeded random order. The deal is random, then repaired by seeded swaps so that no node holds
    two shards of the same label where the labels allow it: McMahan's plain deal leaves about
    one node in ten with a single digit; here every node gets two labels where the data allow.
    """
    if per_node % shards_per_node:
        raise ConfigError(f"partition 'shards' needs samples_per_node ({per_node}) divisible by "
                          f"shards_per_node ({shards_per_node})")
    rng = np.random.default_rng([seed, 4])
    idx = _pool(labels, nodes * per_node, rng, "shards", allow_reuse)
    idx = idx[np.argsort(labels[idx], kind="stable")]  # stable: ties keep the shuffled order
    cut = idx.reshape(nodes * shards_per_node, per_node // shards_per_node)
    shard_label = np.array([np.bincount(labels[s], minlength=classes).argmax() for s in cut])
    deal = rng.permutation(len(cut)).reshape(nodes, shards_per_node)
    _separate_labels(deal, shard_label, rng)
    return [np.concatenate(cut[row]) for row in deal]


def _separate_labels(deal: np.ndarray, shard_label: np.ndarray, rng: np.random.Generator) -> None:
    """Swap shards between nodes (in place) until no node holds two shards of one label, where possible."""
    nodes, per = deal.shape
    for node in range(nodes):
        while True:
            mine = shard_label[deal[node]]
            dup = next((j for j in range(per) if mine[j] in np.delete(mine, j)), None)
            if dup is None or not _swap_one(deal, shard_label, node, dup, rng):
                break  # done, or no swap helps (fewer labels than shards per node)


def _swap_one(deal: np.ndarray, shard_label: np.ndarray, node: int, slot: int, rng: np.random.Generator) -> bool:
    """Swap deal[node, slot] with a shard of another node if that leaves both without a repeated label."""
    give = shard_label[deal[node, slot]]
    keep = np.delete(shard_label[deal[node]], slot)
    for other in rng.permutation(len(deal)):
        theirs = shard_label[deal[other]]
        for k in range(deal.shape[1]):
            if other != node and theirs[k] not in keep and give not in np.delete(theirs, k):
                deal[node, slot], deal[other, k] = deal[other, k], deal[node, slot]
                return True
    return False


def dirichlet(labels: np.ndarray, nodes: int, per_node: int, classes: int, seed: int,
              allow_reuse: bool = False, *, alpha: float = 0.5) -> list[np.ndarray]:
    """Label skew: each label's samples split over nodes in proportions drawn from Dir(alpha).

    A random pool of nodes x per_node samples keeps the dataset's label frequencies; node sizes
    then vary (their mean is exactly per_node, no node is empty). Node sizes are not forced to
    per_node: fixing them as well would bend the Dirichlet draw. Smaller alpha, stronger skew.
    """
    rng = np.random.default_rng([seed, 5])
    idx = _pool(labels, nodes * per_node, rng, "dirichlet", allow_reuse)
    _check_enough(len(idx), nodes, "dirichlet")
    owner = np.full(len(idx), -1, np.int64)
    for label in range(classes):
        here = np.flatnonzero(labels[idx] == label)
        counts = _round_to_total(rng.dirichlet(np.full(nodes, alpha)), len(here))
        owner[here] = np.repeat(np.arange(nodes), counts)
    if (owner < 0).any():
        raise ConfigError(f"partition 'dirichlet': labels outside 0..{classes - 1}")
    # With small alpha some nodes draw nothing of any label: each gets one sample of the largest node.
    sizes = np.bincount(owner, minlength=nodes)
    for node in np.flatnonzero(sizes == 0):
        donor = np.argmax(sizes)
        owner[np.flatnonzero(owner == donor)[-1]] = node
        sizes[donor], sizes[node] = sizes[donor] - 1, 1
    order = np.argsort(owner, kind="stable")
    return _split_by_sizes(idx[order], np.bincount(owner, minlength=nodes))


def quantity(labels: np.ndarray, nodes: int, per_node: int, classes: int, seed: int,
             allow_reuse: bool = False, *, sigma: float = 1.0) -> list[np.ndarray]:
    """Quantity skew: lognormal(0, sigma) node sizes with mean exactly per_node, each >= 1; labels IID."""
    rng = np.random.default_rng([seed, 6])
    idx = _pool(labels, nodes * per_node, rng, "quantity", allow_reuse)
    sizes = _fill_empty(_round_to_total(rng.lognormal(0.0, sigma, nodes), len(idx)), "quantity")
    return _split_by_sizes(idx, sizes)


def like_train(train_parts: list[np.ndarray], train_labels: np.ndarray, test_labels: np.ndarray,
               per_node: int, classes: int, seed: int) -> list[np.ndarray]:
    """Local test splits with each node's training label proportions, per_node samples each.

    Used for the label-skewed partitions: running the partitioner again on the test set would
    deal other labels to a node than its training set has, and its local accuracy would mean
    nothing. Each label's test images are dealt cyclically, so nodes may share a few.
    """
    rng = np.random.default_rng([seed, 7])
    pools = [rng.permutation(np.flatnonzero(test_labels == c)) for c in range(classes)]
    used = np.zeros(classes, np.int64)
    out = []
    for part in train_parts:
        want = _round_to_total(np.bincount(train_labels[part], minlength=classes).astype(float), per_node)
        chosen = []
        for c in np.flatnonzero(want):
            if len(pools[c]) == 0:
                raise ConfigError(f"local test split: label {c} has no test samples")
            chosen.append(np.resize(np.roll(pools[c], -used[c]), want[c]))
            used[c] = (used[c] + want[c]) % len(pools[c])
        out.append(np.concatenate(chosen) if chosen else np.zeros(0, np.int64))
    return out


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "balanced": balanced, "iid": iid, "shards": shards, "dirichlet": dirichlet, "quantity": quantity}


def offsets_of(parts: list[np.ndarray]) -> np.ndarray:
    """Row offsets of node-contiguous shards: node i owns rows offsets[i]:offsets[i+1]."""
    return np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)


def node_ranges(nodes: int, ranks: int, offsets: Optional[np.ndarray] = None) -> list[range]:
    """Contiguous blocks of nodes per rank, at least one node each.

    Without `offsets`: sizes differing by at most one (lower ranks larger). With the training rows'
    offsets (node i owns offsets[i]:offsets[i+1]): cut by cumulative sample count, so each rank gets
    about total/ranks samples of work; rank r starts at the node whose preceding samples come nearest
    r * total / ranks. Placement never changes a result (every draw is seeded by node, not by rank).
    """
    if ranks > nodes:
        raise ConfigError(f"{ranks} MPI ranks but only {nodes} nodes: use at most {nodes} ranks (mpirun -n)")
    if offsets is None or int(offsets[-1]) == 0:
        base, extra = divmod(nodes, ranks)
        starts = [r * base + min(r, extra) for r in range(ranks + 1)]
    else:
        before = np.asarray(offsets[:nodes], dtype=np.int64)  # samples of the nodes ahead of each node
        total = int(offsets[nodes])
        targets = [-(-r * total // ranks) for r in range(ranks)]  # ceil(r * total / ranks), exact in ints
        starts = [nearest_cut(before, t) for t in targets]
        for r in range(1, ranks):  # every rank keeps at least one node, and leaves one for each rank after it
            starts[r] = min(max(starts[r], starts[r - 1] + 1), nodes - (ranks - r))
        starts.append(nodes)
    return [range(starts[r], starts[r + 1]) for r in range(ranks)]


def nearest_cut(before: np.ndarray, target: int) -> int:
    """The node i whose preceding samples before[i] are nearest `target` (the earlier one on a tie)."""
    i = int(np.searchsorted(before, target, side="left"))
    if i == len(before) or (i > 0 and target - before[i - 1] <= before[i] - target):
        return i - 1
    return i
