"""What the peer drivers share: fedmpi's shard file read with h5py, the two models, scoring, one JSON line a round.

Imported by tools/peers/*_tutorial.py in the peers' own virtual environments (torch, numpy, h5py; no fedmpi).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn


def driver_args(description: str) -> argparse.ArgumentParser:
    """The options every driver takes (tools/bench_peers.py passes them all)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-file", type=Path, required=True, help="fedmpi's HDF5 shard file")
    p.add_argument("--init", type=Path, required=True, help="the initial model (a state_dict written by torch.save)")
    p.add_argument("--model", choices=("2nn", "cnn"), default="2nn")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p


def load_shards(path: Path, device: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Each node's (x, y) as float32/int64 tensors (x scaled as fedmpi scales it), and the test set."""
    with h5py.File(path, "r", locking=False) as f:
        scale = float(f.attrs["pixel_scale"])
        x = torch.from_numpy(f["train/x"][:]).to(device).float().mul_(scale)
        y = torch.from_numpy(f["train/y"][:].astype(np.int64)).to(device)
        offsets = f["train/offsets"][:]
        tx = torch.from_numpy(f["test/x"][:]).to(device).float().mul_(scale)
        ty = torch.from_numpy(f["test/y"][:].astype(np.int64)).to(device)
    nodes = [(x[a:b], y[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    return nodes, tx, ty


def layers(model: str, input_shape: tuple[int, ...] = (1, 28, 28), classes: int = 10) -> list[nn.Module]:
    """The layers of fedmpi's `2nn` (784-200-200-10) or `cnn` (McMahan et al.), in fedmpi's order and names."""
    channels, height, width = input_shape
    if model == "2nn":
        return [nn.Flatten(), nn.Linear(channels * height * width, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                nn.Linear(200, classes)]
    return [nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (height // 4) * (width // 4), 512), nn.ReLU(), nn.Linear(512, classes)]


def load_init(module: nn.Module, path: Path) -> nn.Module:
    """The benchmark's initial weights (the same for every contender); weights_only: no code from the file."""
    module.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return module


@torch.no_grad()
def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Share of (x, y) that `module` classifies right, in eval mode."""
    was_training = module.training
    module.eval()
    right = sum(int((module(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    module.train(was_training)
    return right / len(y)


def peak_rss_mib() -> float:
    """Peak RSS of this process (VmHWM; getrusage where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(**fields) -> None:
    """One JSON line on stdout, at once (the benchmark reads the driver's output as it goes)."""
    print(json.dumps(fields), flush=True)
    sys.stdout.flush()
