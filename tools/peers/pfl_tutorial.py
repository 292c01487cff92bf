"""The tutorial round in pfl-research (PyPI `pfl`), PyTorch backend, through its documented simulation API.

    python tools/peers/pfl_tutorial.py --data-file F --init M [--model 2nn] [--rounds 3] [--threads 1]
    torchrun --standalone --nnodes=1 --nproc_per_node=2 tools/peers/pfl_tutorial.py ...   # 2 worker processes

FederatedAveraging over a FederatedDataset built from the nodes of fedmpi's shard file (all 100 each round,
each user once: minimize_reuse sampling), SimulatedBackend with WeightByUser (the plain mean), a central SGD
of lr 1 applying the mean update, and local SGD with momentum from `local_optimizer_create`, which pfl
calls once per user per round: the local optimizer starts afresh every round. Batches are pfl's fixed
slices of each user's data in stored order, the same every epoch and round; that order is one random
permutation of the node's rows, drawn once (fedmpi's file stores them label by label). Under torchrun
pfl splits each cohort between the worker processes and sums their updates with torch.distributed (gloo
on a CPU). Worker 0 scores the main model on the test set after each round and prints one JSON line:
round, seconds (training, aggregation and that scoring), test accuracy; at the end its peak RSS.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import accuracy, driver_args, emit, layers, load_init, load_shards, peak_rss_mib  # noqa: E402
from pacing import Pacer  # noqa: E402


def main() -> None:
    args = driver_args(__doc__.splitlines()[0]).parse_args()
    os.environ.setdefault("PFL_PYTORCH_DEVICE", args.device)  # pfl's documented device override
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    import pfl
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    class Net(torch.nn.Sequential):
        """fedmpi's model with the two methods pfl's PyTorchModel calls."""

        def loss(self, x, y, eval=False):  # noqa: A002 (pfl's keyword)
            self.eval() if eval else self.train()
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y, eval=False):  # noqa: A002
            self.eval() if eval else self.train()
            out = self(x)
            return {"loss": Weighted(float(F.cross_entropy(out, y, reduction="sum")), len(y)),
                    "accuracy": Weighted(float((out.argmax(1) == y).sum()), len(y))}

    rank = get_default_framework_module().distributed.global_rank
    pacer = Pacer.from_env(announce=rank == 0)
    nodes, tx, ty = load_shards(args.data_file, args.device)
    net = load_init(Net(*layers(args.model)), args.init).to(args.device)
    # fedmpi's shard file stores each node's rows label by label; pfl batches a user's data in stored
    # order, so each node's rows are shuffled once here (seeded by node), as a user's data would come.
    orders = [torch.randperm(len(y), generator=torch.Generator().manual_seed(k)) for k, (_, y) in enumerate(nodes)]
    data = {k: [x[o.to(x.device)], y[o.to(x.device)]] for k, ((x, y), o) in enumerate(zip(nodes, orders))}
    del nodes
    users = FederatedDataset.from_slices(data, get_user_sampler("minimize_reuse", list(data)))

    class PacedRounds(TrainingProcessCallback):
        """Each round started by the benchmark; worker 0 scores the main model and prints the round's line."""

        def on_train_begin(self, *, model):
            pacer.wait(1)
            self.t0 = time.perf_counter()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            k = central_iteration + 1
            if rank == 0:
                acc = accuracy(net, tx, ty)
                emit(round=k, seconds=time.perf_counter() - self.t0, test_acc=acc)
            pacer.wait(k + 1)   # after the last round: the benchmark reads memory while all is up
            self.t0 = time.perf_counter()
            return False, Metrics()

    emit(event="start", versions=dict(pfl=pfl.__version__, torch=torch.__version__), rank=rank,
         world_size=get_default_framework_module().distributed.world_size, threads=torch.get_num_threads())
    model = PyTorchModel(model=net, local_optimizer_create=functools.partial(torch.optim.SGD, momentum=args.momentum),
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    backend = SimulatedBackend(training_data=users, val_data=None, postprocessors=[WeightByUser()])
    # evaluation_frequency past the last round: no per-user scoring before and after local training
    # (pfl does it in its first iteration whatever the setting); the test set is scored above.
    params = NNAlgorithmParams(central_num_iterations=args.rounds, evaluation_frequency=args.rounds + 1,
                               train_cohort_size=len(data), val_cohort_size=None)
    train = NNTrainHyperParams(local_learning_rate=args.lr, local_num_epochs=args.epochs,
                               local_batch_size=args.batch_size)
    FederatedAveraging().run(algorithm_params=params, backend=backend, model=model, model_train_params=train,
                             callbacks=[PacedRounds()])
    if rank == 0:
        emit(event="end", peak_rss_mib=peak_rss_mib())


if __name__ == "__main__":
    main()
