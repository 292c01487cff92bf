"""Aggregation math, pure torch: no MPI here, so it is tested with hand-computed arrays.

Each rank packs sum_k w_k * (theta_k - theta_main) over its nodes, followed by sum_k w_k, into
one flat buffer; one Allreduce(SUM) adds the ranks; `apply_update` divides and adds the mean
update to the main model. Summing updates rather than weights keeps the rounding error of the
float32 collective at the scale of the update, far below the weights' own last bit, so the
result hardly depends on how many ranks took part.
"""
from __future__ import annotations

import numpy as np
import torch


def node_weights(aggregation: str, samples: np.ndarray) -> np.ndarray:
    """'mean': every node counts once (the tutorial); 'weighted': by its sample count (FedAvg)."""
    if aggregation == "mean":
        return np.ones(len(samples))
    if aggregation == "weighted":
        return np.asarray(samples, dtype=np.float64)
    raise ValueError(f"unknown aggregation {aggregation!r}")


class UpdateSum:
    """Accumulates weighted updates of this rank's nodes in float64, on the training device."""

    def __init__(self, main: torch.Tensor) -> None:
        self.main = main
        self.total = torch.zeros(main.numel(), dtype=torch.float64, device=main.device)
        self.weight = 0.0

    def add(self, params: torch.Tensor, weights: np.ndarray) -> None:
        """Add rows params[j] with weights[j] (params: [k, P])."""
        w = torch.as_tensor(weights, dtype=torch.float64, device=params.device)
        self.total += w @ (params.double() - self.main.double())
        self.weight += float(np.sum(weights))

    def pack(self) -> np.ndarray:
        """The collective's payload: float32 [P + 1], the weight sum last."""
        buf = np.empty(self.main.numel() + 1, dtype=np.float32)
        buf[:-1] = self.total.cpu().numpy()
        buf[-1] = self.weight
        return buf


def apply_update(main: torch.Tensor, reduced: np.ndarray) -> torch.Tensor:
    """The new main model from the all-reduced buffer: main + (sum of w*update) / (sum of w)."""
    weight = float(reduced[-1])
    if weight <= 0:
        raise ValueError("no node contributed to this round (total weight is zero)")
    update = torch.from_numpy(reduced[:-1].astype(np.float64) / weight).to(main.device)
    return (main.double() + update).to(main.dtype)


def wire_bytes_estimate(payload_bytes: int, ranks: int) -> int:
    """Bytes one rank sends in a ring Allreduce: 2 (P-1)/P x payload (reduce-scatter + allgather)."""
    return 0 if ranks <= 1 else int(round(2 * (ranks - 1) / ranks * payload_bytes))
