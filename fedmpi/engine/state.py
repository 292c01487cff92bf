"""Per-node state that lives across rounds: named [nodes, P] tensors, allocated only when a run needs them.

"momentum" (local SGD's buffer, kept with `local_state: keep` and `momentum > 0`), "control" (SCAFFOLD's
c_i) and "buffers" (with `buffers: local`, each node's own BatchNorm running statistics, [nodes, B]).
A stateless run (`local_state: reset`, or momentum 0, where a buffer never reaches the next round's
math) holds no [nodes, P] tensor at all: each chunk trains from a zero buffer of its own, so a rank's
memory does not grow with its node count. Algorithms with more per-node state (control variates,
personal models) register another name; checkpoints, the abandoned-round undo and a diverged node's
reset go through the store, so they follow whatever is registered.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import node_state_names
from ..fl.algorithms import ditto_start, personal_columns, shared_columns


class NodeState:
    """Named per-node tensors [nodes, P] of one rank's block, in node order (dtype None: torch's default)."""

    def __init__(self, nodes: int, size: int, device: torch.device, dtype: Optional[torch.dtype] = None) -> None:
        self.nodes, self.size, self.device, self.dtype = nodes, size, device, dtype
        self.tensors: dict[str, torch.Tensor] = {}
        self.initial: dict[str, torch.Tensor] = {}  # a row a reset goes back to; zeros where absent

    def register(self, name: str, size: Optional[int] = None) -> torch.Tensor:
        """Allocate the zero-filled tensor `name` [nodes, size or P] (once; a second call returns the same one)."""
        if name not in self.tensors:
            width = self.size if size is None else size
            self.tensors[name] = torch.zeros(self.nodes, width, device=self.device, dtype=self.dtype)
        return self.tensors[name]

    def get(self, name: str) -> Optional[torch.Tensor]:
        """The tensor `name`, or None when this run keeps no such state."""
        return self.tensors.get(name)

    def rows(self, name: str, part: torch.Tensor) -> Optional[torch.Tensor]:
        """A copy of the rows `part` (local indices) of `name`, or None when not kept."""
        t = self.tensors.get(name)
        return None if t is None else t.index_select(0, part.to(t.device))

    def reset_row(self, k: int) -> None:
        """Node k starts afresh (a diverged node): every kept tensor's row back to zero, kept buffers back to
        the model's initial ones (a zero running variance would blow up its scores)."""
        for name, t in self.tensors.items():
            if name in self.initial:
                t[k].copy_(self.initial[name])
            else:
                t[k].zero_()

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)


def make_state(cfg, nodes: int, size: int, device: torch.device, dtype: Optional[torch.dtype] = None,
               widths: Optional[dict] = None, initial_buffers: Optional[torch.Tensor] = None) -> NodeState:
    """The store with every tensor this config keeps already registered; `widths`: names narrower than P
    (personal layers: only their columns); "buffers" (`buffers: local`) is [nodes, B], every row starting
    from the model's initial float buffers `initial_buffers` [B]."""
    store = NodeState(nodes, size, device, dtype)
    for name in node_state_names(cfg):
        if name == "buffers":
            initial = torch.zeros(0, device=device) if initial_buffers is None else initial_buffers.to(device)
            store.register(name, initial.numel()).copy_(initial.expand(nodes, -1))
            store.initial[name] = initial.clone()
        else:
            store.register(name, (widths or {}).get(name))
    return store


def layer_columns(cfg, model, size: int, device: torch.device) -> tuple:
    """(the flat columns of the model's personal layers (config key personal_layers), the shared columns),
    both on `device`; (None, None) without personal layers."""
    prefixes = getattr(cfg, "personal_layers", None)
    if not prefixes:
        return None, None
    cols = personal_columns([(n, p.numel()) for n, p in model.named_parameters()], prefixes)
    return cols.to(device), shared_columns(cols, size).to(device)


def with_own_layers(main: torch.Tensor, own: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """K starting points [K, P]: `main` with each node's own values of the personal columns (`own` [K, len(cols)];
    a node that has not trained yet, its row all zero, starts from main's values)."""
    start = main.expand(own.shape[0], -1).clone()
    start[:, cols] = ditto_start(own, main[cols])
    return start
