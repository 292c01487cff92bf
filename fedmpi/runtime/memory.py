"""Memory estimated before it is allocated: the prepare stage's peak, one rank's footprint, and what
the machine has (MemAvailable, lowered by a cgroup v1/v2 limit; a GPU's free memory).

The estimates are pure functions of the config and a few sizes, checked against hand-computed
numbers in tests/runtime/test_memory.py; prepare.py and rank.py call them before the allocations
they predict, so a config that cannot fit ends with one line giving the estimate instead of with
the OOM killer. They lean generous (a rank's peak adds up buffers that are only partly alive at
once), so a refusal means the run would not have fitted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

# (training images, test images, bytes per image) of the real datasets as published.
RAW_SIZES = {"mnist": (60000, 10000, 784), "fashion-mnist": (60000, 10000, 784), "cifar10": (50000, 10000, 3072)}
SYNTHETIC_TEST, SYNTHETIC_CLASSES, SYNTHETIC_IMAGE = 1000, 10, 784
SYNTHETIC_DRAW = 2 * 8  # bytes per pixel of a block sources.synthetic draws: two float64 arrays at once (numpy
                        # adds into the noise's temporary; np.clip writes a second array)
SYNTHETIC_BLOCK = 1 << 16  # images sources.synthetic draws at a time
LABEL = 8               # int64 labels
GATHERED_EXTRA = 40     # per shard-file row besides its image: label, its copy, index, concatenated index
# shards.write_shards builds the file's image in memory before writing it: every row (node rows and the
# test set) once more, image and label, in a buffer that grows by an eighth at a time.
IMAGE_GROWTH = 9 / 8
STREAMED_EXTRA = 16     # per row of a streamed file: its index in the partition's parts, and their offsets
PLAN_SLOT = 8 + 1 + 8 + 4  # per batch-plan slot: int64 row index, bool mask, float64 then float32 weight
FLOAT = 4               # float32
PREPARE_OVERHEAD = 1 << 20  # the rest of prepare: class prototypes, partition bookkeeping, HDF5 buffers
UNLIMITED = 1 << 60     # cgroup v1 writes "no limit" as a number near 2^63


def human(n: float) -> str:
    """Bytes for a person: 437.0 TiB, 22.1 GiB, 512 B."""
    for power, unit in enumerate(("EiB", "PiB", "TiB", "GiB", "MiB", "KiB")):
        size = 1 << (10 * (6 - power))
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def prepare_peak(dataset: str, nodes: int, samples_per_node: int, test_per_node: int,
                 synthetic_pixels: int = SYNTHETIC_IMAGE) -> tuple[int, str]:
    """Peak bytes of the prepare stage (raw dataset, then the gathered shards and the file image built
    from them) and how they were counted; `synthetic_pixels`: values per synthetic image (synthetic_shape)."""
    from ..data.streamed import STREAM_FILE_BYTES, STREAM_ROWS  # data/ imports this module

    rows = nodes * (samples_per_node + test_per_node)
    if dataset == "synthetic":
        px, test = synthetic_pixels, SYNTHETIC_TEST
    else:
        _, test, px = RAW_SIZES[dataset]
    if (rows + test) * (px + LABEL) > STREAM_FILE_BYTES:  # streamed (data/streamed.py): one block gathered
        shards, image_file = rows * STREAMED_EXTRA + min(rows, STREAM_ROWS) * (px + GATHERED_EXTRA), 0
    else:
        shards, image_file = rows * (px + GATHERED_EXTRA), int((rows + test) * (px + LABEL) * IMAGE_GROWTH)
    if dataset == "synthetic":
        train = max(nodes * samples_per_node, SYNTHETIC_CLASSES)
        raw = (train + SYNTHETIC_TEST) * (px + LABEL)
        # sources.synthetic draws SYNTHETIC_BLOCK images at a time through float64
        drawn = train * (px + LABEL) + min(train, SYNTHETIC_BLOCK) * SYNTHETIC_DRAW * px
        how = (f"nodes x samples_per_node = {train:,} synthetic images of {px} px, "
               f"drawn {SYNTHETIC_BLOCK:,} at a time in float64 at {SYNTHETIC_DRAW * px:,} B each")
        return PREPARE_OVERHEAD + max(drawn, raw + shards + image_file), how
    train = RAW_SIZES[dataset][0]
    how = (f"{train + test:,} {dataset} images, then nodes x (samples_per_node + test_per_node) = "
           f"{rows:,} rows" + (f" of {px + GATHERED_EXTRA:,} B, and the file's image of {human(image_file)}"
                               if image_file else f", written {STREAM_ROWS:,} at a time"))
    return PREPARE_OVERHEAD + (train + test) * (px + LABEL) + shards + image_file, how


@dataclass(frozen=True)
class RankRows:
    """What one rank will hold, counted from the shard file's offsets."""

    nodes: int         # nodes on this rank
    train: int         # their training rows
    local: int         # their local test rows
    max_train: int     # the largest node's training rows (sets the batch plan's length)
    max_local: int     # the largest node's local test rows
    test: int = 0      # rank 0: the test set's rows
    central: int = 0   # rank 0 training the centralized baseline: every node's training rows


@dataclass(frozen=True)
class Work:
    """The model and engine as far as memory goes."""

    pixels: int        # values per input row (784 for MNIST)
    params: int        # parameters P of the model
    activations: int   # bytes of activations and their gradients per sample (engine.batched.activation_bytes)
    chunk: int         # K: nodes trained together (1 for the sequential engine)
    workers: int       # chunks in training at once (the batched engine's CPU threads, else 1)
    batch_size: int
    local_epochs: int
    node_state: int = 1  # [nodes, P] tensors kept across rounds: 1 (momentum) with local_state keep, 0 stateless
    control: bool = False  # SCAFFOLD: control variates per node and on the server, a second half of the payload
    pixel_bytes: int = FLOAT  # bytes per input value in the shard file (1 for uint8 images, 4 for float32)
    personal: bool = False  # Ditto: a personal model per node, trained after the global one in each chunk
    own_layers: int = 0  # personal layers: values each node keeps of its own


def chunk_bytes(rows: RankRows, w: Work) -> int:
    """One chunk's working set: K nodes' parameters, gradients, momentum and result, their batches'
    activations, the batch plan (every step's slots), and the scoring of their local test rows."""
    per_epoch = math.ceil(rows.max_train / w.batch_size) * w.batch_size
    training = w.chunk * (4 * w.params * FLOAT + w.batch_size * w.activations)
    plan = w.chunk * w.local_epochs * per_epoch * PLAN_SLOT
    scoring = w.chunk * rows.max_local * (w.pixels * FLOAT + w.activations // 2)
    # SCAFFOLD: each node's correction c - c_i, its per-layer copy, and its new c_i
    control = 3 * w.chunk * w.params * FLOAT if w.control else 0
    personal = 2 * w.chunk * w.params * FLOAT if w.personal else 0  # Ditto: the personal pass's start and momentum
    return training + plan + scoring + control + personal


def row_bytes(pixels: int, gpu: bool, pixel_bytes: int = FLOAT) -> tuple[int, int]:
    """(bytes on the device, bytes on the host) per data row: the input in the file's dtype (converted to
    float32 only per batch, engine/rows.py) and the int64 label; on a GPU the rows as read stay on the host
    until setup returns, on a CPU the device block is the memory read."""
    device = pixels * pixel_bytes + LABEL
    return (device, device) if gpu else (device, 0)


def rank_parts(rows: RankRows, w: Work, gpu: bool) -> dict[str, int]:
    """A rank's bytes on its device (the host on a CPU), by part."""
    row = row_bytes(w.pixels, gpu, w.pixel_bytes)[0]
    return {"training rows": rows.train * row, "local test rows": rows.local * row, "test set": rows.test * row,
            "momentum": w.node_state * rows.nodes * w.params * FLOAT,
            "chunk working set": w.workers * chunk_bytes(rows, w),
            "centralized baseline": rows.central * row + (4 * w.params * FLOAT if rows.central else 0),
            **control_parts(rows, w),
            **({"personal models": rows.nodes * w.params * FLOAT} if w.personal else {}),
            **({"personal layers": rows.nodes * w.own_layers * FLOAT} if w.own_layers else {})}


def control_parts(rows: RankRows, w: Work) -> dict[str, int]:
    """SCAFFOLD's lasting state: c_i of every node here, the server's c, and the payload's second half
    (the control deltas) with their running sum."""
    return {"control variates": (rows.nodes + 3) * w.params * FLOAT} if w.control else {}


def peak(parts: dict[str, int]) -> int:
    """A rank's peak: what stays for the run, plus the larger of the baseline (freed before round 1) and the chunks."""
    transient = ("chunk working set", "centralized baseline")
    return sum(v for k, v in parts.items() if k not in transient) + max(parts[k] for k in transient)


def host_staging(rows: RankRows, w: Work) -> int:
    """Host bytes of a rank whose data lives on a GPU: the rows as read from the shard file."""
    return (rows.train + rows.local + rows.test + rows.central) * row_bytes(w.pixels, True, w.pixel_bytes)[1]


ADVICE = {"training rows": "lower samples_per_node, or spread the nodes over more hosts",
          "local test rows": "lower test_per_node, or spread the nodes over more hosts",
          "test set": "use a host with more memory for rank 0",
          "momentum": "give each rank fewer nodes (more ranks, on more hosts) or lower nodes",
          "chunk working set": "lower chunk_nodes, batch_size or threads",
          "centralized baseline": "set central_epochs=0, or use a host with more memory for rank 0"}


@dataclass(frozen=True)
class Report:
    """One rank's need and what its host (and GPU) offer, as exchanged by every rank before loading data."""

    rank: int
    host: str
    device: str                # "cpu" or "cuda:N"
    parts: dict                # bytes by part on the device (on the host for a CPU rank)
    host_free: Optional[int]   # None: not known, not checked
    device_free: Optional[int] = None
    staging: int = 0           # a GPU rank's host bytes (host_staging)

    def need(self, pool: str) -> int:
        """Bytes this rank takes from `pool`: "host", or its device."""
        return peak(self.parts) if pool != "host" or self.device == "cpu" else self.staging


def refusal(reports: list[Report]) -> Optional[str]:
    """The one-line refusal when the ranks sharing a host (or a GPU) need more than it has, else None."""
    pools: dict[tuple[str, str], list[Report]] = {}
    for r in reports:
        pools.setdefault((r.host, "host"), []).append(r)
        if r.device != "cpu":
            pools.setdefault((r.host, r.device), []).append(r)
    for (host, pool), members in pools.items():
        frees = [r.host_free if pool == "host" else r.device_free for r in members]
        need = sum(r.need(pool) for r in members)
        if any(f is None for f in frees) or need <= min(frees):
            continue
        big = max(members, key=lambda r: r.need(pool))
        if pool == "host" and big.device != "cpu":
            shown, advice = f"shard rows as read {human(big.staging)}", ADVICE["training rows"]
        else:
            top = sorted(big.parts.items(), key=lambda kv: -kv[1])
            shown, advice = ", ".join(f"{k} {human(v)}" for k, v in top[:3] if v), ADVICE[top[0][0]]
        place = f"host {host}" if pool == "host" else f"{pool} of host {host}"
        ranks = f"{len(members)} ranks" if len(members) > 1 else "1 rank"
        return (f"config needs about {human(need)} on {place} ({ranks}; rank {big.rank}: {shown}), "
                f"which has {human(min(frees))} available; {advice}")
    return None


def meminfo_available(path: Path = Path("/proc/meminfo")) -> Optional[int]:
    """MemAvailable in bytes, or None where the kernel does not say."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _inactive_file(path: Path) -> int:
    """Reclaimable page cache a cgroup's usage counts (as `docker stats` subtracts it)."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """Bytes left under this process's tightest cgroup memory limit (v2 or v1, any level up), None if unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    dirs = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: memory.max, memory.current
            dirs += [(d, "memory.max", "memory.current") for d in _levels(root, path)]
        elif "memory" in controllers.split(","):
            dirs += [(d, "memory.limit_in_bytes", "memory.usage_in_bytes") for d in _levels(root / "memory", path)]
    rooms = []
    for folder, limit_name, usage_name in dirs:
        limit, usage = _read_int(folder / limit_name), _read_int(folder / usage_name)
        if limit is not None and limit < UNLIMITED and usage is not None:
            rooms.append(limit - max(0, usage - _inactive_file(folder / "memory.stat")))
    return max(0, min(rooms)) if rooms else None


def _levels(root: Path, path: str) -> list[Path]:
    """The cgroup's folder and each parent up to the mount point (a limit may sit on any of them)."""
    parts = [p for p in path.strip().split("/") if p and p != ".."]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def host_available() -> Optional[int]:
    """Bytes this process may still allocate: MemAvailable, lowered by a cgroup limit; None when unknown."""
    known = [v for v in (meminfo_available(), cgroup_room()) if v is not None]
    return min(known) if known else None


def check_prepare(dataset: str, nodes: int, samples_per_node: int, test_per_node: int,
                  synthetic_pixels: int = SYNTHETIC_IMAGE) -> None:
    """Refuse, before the raw dataset is loaded, a shard file whose preparation cannot fit in this host's memory."""
    need, how = prepare_peak(dataset, nodes, samples_per_node, test_per_node, synthetic_pixels)
    free = host_available()
    if free is not None and need > free:
        lower = "nodes or samples_per_node" if dataset == "synthetic" else "nodes, samples_per_node or test_per_node"
        raise ConfigError(f"config needs about {human(need)} to prepare the shard file ({how}), this machine has "
                          f"{human(free)} available; lower {lower}")
