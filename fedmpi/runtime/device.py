"""Where a rank computes: its GPU (by node-local rank) or the CPU, and how many threads it uses."""
from __future__ import annotations

import os

import torch

from ..errors import ConfigError


def pick_device(setting: str, local_rank: int) -> torch.device:
    """'auto': cuda:(local_rank % gpus) when CUDA is usable, else the CPU."""
    if setting == "cpu":
        return torch.device("cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        if setting == "cuda":
            raise ConfigError("config key 'device' is 'cuda' but no CUDA device is visible to this rank")
        return torch.device("cpu")
    return torch.device("cuda", local_rank % gpus)


def ranks_on_gpu(local_rank: int, local_size: int, gpus: int) -> int:
    """How many of the host's `local_size` ranks share this rank's GPU, cuda:(local_rank % gpus)."""
    if gpus <= 0:
        return 1
    return len(range(local_rank % gpus, local_size, gpus))


def ranks_on_device(device: torch.device, local_rank: int, local_size: int) -> int:
    """Ranks of this host on `device`: those sharing its GPU (pick_device's mapping), 1 for the CPU."""
    if device.type != "cuda":
        return 1
    return ranks_on_gpu(local_rank, local_size, torch.cuda.device_count())


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


THREADS_PER_CPU = 4  # beyond this, threads only add switching; the batched engine runs one chunk per thread


def pick_threads(setting: int, ranks_on_host: int) -> int:
    """Torch threads per rank: the setting, or the host's cores shared out among its ranks (at least 1)."""
    cpus = os.cpu_count() or 1
    if setting > THREADS_PER_CPU * cpus:
        raise ConfigError(f"config key 'threads' is {setting}, more than {THREADS_PER_CPU} per logical CPU of this "
                          f"host ({cpus}); use at most {THREADS_PER_CPU * cpus}, or 0 to share the cores out")
    return setting if setting > 0 else max(1, host_cores() // max(1, ranks_on_host))


def configure_torch(threads: int) -> None:
    torch.set_num_threads(threads)
    # Momentum buffers decay towards subnormal floats after a few rounds; on x86 CPUs those run
    # 10-100x slower. Flushing them to zero changes nothing measurable in accuracy.
    torch.set_flush_denormal(True)
