"""Update rules of the algorithms for non-IID data, pure torch: no MPI here, tested on hand-computed arrays.

SCAFFOLD (Karimireddy et al. 2020, option II): each node i keeps a control variate c_i, the server
keeps c. Every local step follows the gradient corrected by (c - c_i); after training,
c_i+ = c_i - c + (x - y_i) / (steps_i * lr) and the node sends delta_i = c_i+ - c_i beside its
model update; the server sets c += (1 / N) * sum_{i in S} delta_i, i.e. (|S| / N) times the mean delta.
"""
from __future__ import annotations

import numpy as np
import torch


def scaffold_correction(server_c: torch.Tensor, node_c: torch.Tensor) -> torch.Tensor:
    """The term each local gradient gets: c - c_i ([K, P] from c [P] and c_i [K, P])."""
    return server_c.unsqueeze(0) - node_c


def scaffold_node_controls(node_c: torch.Tensor, server_c: torch.Tensor, main: torch.Tensor,
                           trained: torch.Tensor, steps: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_i+, delta_i = c_i+ - c_i) for K nodes: c_i+ = c_i - c + (x - y_i) / (steps_i lr).

    node_c, trained: [K, P]; server_c, main: [P]; steps: [K] local steps taken. A node that took
    no step (no data) keeps its c_i and sends a zero delta.
    """
    took = steps > 0
    inv = torch.where(took, 1.0 / (steps.clamp(min=1).to(torch.float64) * lr), 0.0).to(node_c.dtype)
    delta = (main.unsqueeze(0) - trained.to(node_c.dtype)) * inv.unsqueeze(1) - server_c.unsqueeze(0)
    delta = torch.where(took.unsqueeze(1), delta, torch.zeros_like(delta))
    return node_c + delta, delta


def scaffold_server_control(server_c: torch.Tensor, delta_sum: torch.Tensor, nodes: int) -> torch.Tensor:
    """c += (1 / N) sum of the round's deltas, in place (N: all nodes, not only the selected ones); returns c."""
    return server_c.add_(delta_sum.to(server_c.device, server_c.dtype), alpha=1.0 / nodes)


# FedNova (Wang et al. 2020), plain local SGD: node i takes tau_i steps and sends its update divided by
# tau_i; the server moves by tau_eff = sum_i p_i tau_i times the weighted mean of those normalized
# updates, so a node that took more steps no longer pulls the average its way (quantity skew).

def local_steps(samples, epochs: int, batch_size: int):
    """tau_i: the steps a node takes in one round (`epochs` passes of ceil(n_i / B) batches)."""
    return epochs * -(-np.asarray(samples, dtype=np.int64) // batch_size)


def fednova_row_weights(weights, steps):
    """(weights of the normalized updates w_i / tau_i, the tally w_i tau_i); a node without steps sends nothing."""
    weights, steps = np.asarray(weights, dtype=np.float64), np.asarray(steps, dtype=np.float64)
    took = steps > 0
    return np.where(took, weights / np.maximum(steps, 1), 0.0), weights * steps


def fednova_rows(weights, samples, epochs: int, batch_size: int) -> tuple:
    """A chunk's part of the FedNova buffer: (update weights w_i / tau_i, trailer weights w_i, the one
    extra value sum w_i tau_i as a [1, 1] tensor)."""
    rows, tally = fednova_row_weights(weights, local_steps(samples, epochs, batch_size))
    return rows, weights, torch.tensor([[float(tally.sum())]])


def fednova_scale(total_weight: float, weighted_steps: float) -> float:
    """The factor on the all-reduced sum of w_i (y_i - x) / tau_i: tau_eff / W = (sum w_i tau_i) / W^2."""
    return weighted_steps / (total_weight * total_weight)


# Ditto (Li et al. 2021, Algorithm 1): a selected node trains the global model as FedAvg does (that update
# alone enters the average) and, for the same local steps, its personal model v_k on
# F_k(v) + lambda/2 ||v - w||^2, w the global model received this round. v_k never leaves the node.

def ditto_start(personal: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
    """Where K personal models start this round ([K, P]): each kept v_k, or `main` for a node that has
    never trained (its row still all zero: v_k is initialised to the global model it first receives)."""
    fresh = ~personal.ne(0).any(dim=1, keepdim=True)
    return torch.where(fresh, main.to(personal.dtype).unsqueeze(0), personal)


# FedPer (Arivazhagan et al. 2019): the layers named by `personal_layers` stay on each node and never
# enter the average; the rest is shared. A prefix names a parameter by its full name or a dotted head.

def personal_columns(named: list[tuple[str, int]], prefixes: list[str]) -> torch.Tensor:
    """The flat-vector columns (ascending) of the parameters whose names match one of `prefixes`, from
    (name, numel) in model.parameters() order; a prefix that names no parameter, or taking every one,
    is a ConfigError naming it."""
    from ..errors import ConfigError

    def matches(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    for prefix in prefixes:
        if not any(matches(name, prefix) for name, _ in named):
            some = ", ".join(name for name, _ in named[:12])
            raise ConfigError(f"config key 'personal_layers': no parameter of the model is {prefix!r} or starts with "
                              f"'{prefix}.' (its parameters: {some})")
    cols, at = [], 0
    for name, size in named:
        if any(matches(name, p) for p in prefixes):
            cols.append(torch.arange(at, at + size))
        at += size
    picked = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.int64)
    if len(picked) == at:
        raise ConfigError("config key 'personal_layers' names every parameter of the model: nothing would be shared")
    return picked


def shared_columns(personal: torch.Tensor, size: int) -> torch.Tensor:
    """The columns of a flat vector of `size` values not in `personal` (ascending)."""
    keep = torch.ones(size, dtype=torch.bool)
    keep[personal] = False
    return keep.nonzero().squeeze(1)
