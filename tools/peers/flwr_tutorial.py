"""The tutorial round in Flower (`flwr[simulation]`): its Ray-backed simulation engine, ServerApp + ClientApp, FedAvg.

    python tools/peers/flwr_tutorial.py --data-file F --init M [--model 2nn] [--rounds 3] [--threads 1] [--workers 2]

run_simulation with 100 SuperNodes (one per node of fedmpi's shard file, partition-id = node) and
client_resources num_cpus = --threads: Ray runs cores/num_cpus backend workers at once, each executing
one ClientApp at a time (tools/peers/flwr_client.py). The ServerApp's FedAvg trains all 100 nodes each
round (fraction_train 1, no client-side evaluation), weighting by num-examples (all 450: the plain mean).
Its evaluate_fn scores the main model on the test set after each round and prints one JSON line:
round, seconds (Flower's round trip, training, aggregation, that scoring), test accuracy; at the end the
driver's peak RSS (Ray's processes are separate; tools/bench_peers.py adds up the whole process tree).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import accuracy, driver_args, emit, layers, load_init, load_shards, peak_rss_mib  # noqa: E402
from pacing import Pacer  # noqa: E402


def server_app(args, pacer: Pacer):
    """The ServerApp: FedAvg over every node for args.rounds rounds, each round started by the benchmark."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    net = load_init(torch.nn.Sequential(*layers(args.model)), args.init).to(args.device)
    _, tx, ty = load_shards(args.data_file, args.device)
    clock = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round == 0:   # called once before round 1
            acc = float("nan")
        else:
            net.load_state_dict(arrays.to_torch_state_dict())
            acc = accuracy(net, tx, ty)
            emit(round=server_round, seconds=time.perf_counter() - clock["t0"], test_acc=acc)
        pacer.wait(server_round + 1)   # after the last round: the benchmark reads memory while all is up
        clock["t0"] = time.perf_counter()
        return MetricRecord({"accuracy": acc})

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = args.nodes
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
        config = ConfigRecord({"data-file": str(args.data_file), "device": args.device, "model": args.model,
                               "epochs": args.epochs, "batch-size": args.batch_size, "lr": args.lr,
                               "momentum": args.momentum, "threads": args.threads})
        strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()), num_rounds=args.rounds,
                       train_config=config, evaluate_fn=evaluate)

    return app


def main() -> None:
    p = driver_args(__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=100, help="SuperNodes: the shard file's node count")
    p.add_argument("--gpus-per-client", type=float, default=0.0, help="client_resources num_gpus (with --device cuda)")
    p.add_argument("--ray-num-cpus", type=int, default=0, help="CPUs Ray may use (init_args; 0: all of them)")
    args = p.parse_args()
    # Ray's workers import the ClientApp's module by name: they inherit this PYTHONPATH.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [q for q in [os.environ.get("PYTHONPATH")] if q])
    import flwr
    import ray
    import torch
    from flwr.simulation import run_simulation
    from flwr_client import app as client_app

    torch.set_num_threads(args.threads)
    pacer = Pacer.from_env(announce=True)
    emit(event="start", versions=dict(flwr=flwr.__version__, ray=ray.__version__, torch=torch.__version__),
         threads=args.threads)
    backend = {"client_resources": {"num_cpus": args.threads, "num_gpus": args.gpus_per_client}}
    if args.ray_num_cpus:
        backend["init_args"] = {"num_cpus": args.ray_num_cpus}
    run_simulation(server_app=server_app(args, pacer), client_app=client_app, num_supernodes=args.nodes,
                   backend_config=backend)
    emit(event="end", peak_rss_mib=peak_rss_mib())


if __name__ == "__main__":
    main()
