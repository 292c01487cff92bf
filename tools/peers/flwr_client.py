"""The Flower ClientApp of tools/peers/flwr_tutorial.py, in its own module so that Ray's workers import it
once (by name, through PYTHONPATH) and keep its data cache between the ClientApps they run.

A ClientApp lives for one message (Flower's simulation is ephemeral), so its local optimizer is new each
round, as in Flower's PyTorch quickstart; batches are a fresh shuffle each epoch (a DataLoader's
shuffle=True, drawn here with randperm on tensors already in memory, seeded by node and round).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import layers, load_shards  # noqa: E402

app = ClientApp()
_NODES: dict = {}   # (data file, device) -> every node's tensors, loaded once per worker process


def node_data(path: str, device: str, node: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Node `node`'s training tensors from fedmpi's shard file (the file is read once per process)."""
    key = (path, device)
    if key not in _NODES:
        _NODES.clear()
        _NODES[key] = load_shards(Path(path), device)[0]
    return _NODES[key][node]


def sgd_epochs(net, x, y, epochs: int, batch: int, opt, gen: torch.Generator) -> None:
    """`epochs` passes over (x, y) in a fresh random order each, the last batch short."""
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen).to(x.device)
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node from the received model for the configured epochs; reply with the new weights."""
    cfg = msg.content["config"]
    node = int(context.node_config["partition-id"])
    rnd = int(cfg["server-round"])
    torch.set_num_threads(int(cfg["threads"]))
    x, y = node_data(str(cfg["data-file"]), str(cfg["device"]), node)
    net = torch.nn.Sequential(*layers(str(cfg["model"]))).to(x.device)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=float(cfg["lr"]), momentum=float(cfg["momentum"]))
    gen = torch.Generator().manual_seed(1_000_003 * rnd + node)
    sgd_epochs(net, x, y, int(cfg["epochs"]), int(cfg["batch-size"]), opt, gen)
    reply = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(content=reply, reply_to=msg)
