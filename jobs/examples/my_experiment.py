"""Federated training from your own script, with a model defined right here.

    mpirun -n 4 python jobs/examples/my_experiment.py data/femnist.h5 --out runs/my_experiment

Every rank runs this script; fedmpi.run trains on all of them and returns the metrics rows on rank 0
(None on the others). The shard file is any valid one, e.g. made by `fedmpi import tff` or `import npz`.
"""
import argparse
import sys

from torch import nn

import fedmpi


class Classifier(nn.Module):
    """A plain MLP over the flattened inputs; fedmpi passes input_shape and classes from the shard file."""

    def __init__(self, input_shape, classes, hidden=64):
        super().__init__()
        size = 1
        for d in input_shape:
            size *= d
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.layers(x)


def squared_error(outputs, targets):
    """One loss per row: the squared distance of the softmax to the one-hot target (the Brier score)."""
    one_hot = outputs.new_zeros(outputs.shape).scatter(1, targets[:, None], 1.0)  # vmap-friendly one-hot
    return ((outputs.softmax(1) - one_hot) ** 2).sum(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_file", help="a shard file (fedmpi import ...)")
    parser.add_argument("--out", default="runs/my_experiment", help="run directory")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = {"dataset": "file", "data_file": args.data_file, "rounds": args.rounds, "local_epochs": 2,
              "batch_size": 16, "lr": 0.05, "aggregation": "weighted", "central_epochs": 0,
              "model_args": {"hidden": 32}}
    try:
        rows = fedmpi.run(config, model=Classifier, loss=squared_error, out=args.out, overwrite=True)
    except fedmpi.FedmpiError as err:  # raised on every rank alike: one line, from rank 0
        if fedmpi.world_rank() == 0:
            print(f"my_experiment: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    if rows is not None:  # rank 0
        for row in rows:
            print(f"round {row['round']}: test accuracy {row['test_acc']:.4f}, test loss {row['test_loss']:.4f}")


if __name__ == "__main__":
    main()
