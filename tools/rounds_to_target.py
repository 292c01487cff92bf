"""Rounds to a target test accuracy, one markdown table row per run directory.

    python tools/rounds_to_target.py runs/a runs/b --target 0.97

A run reaches the target in the first round whose `test_acc` (metrics.jsonl) is >= the target;
rounds without a test score (eval_every > 1) are skipped. A run that never reaches it reads
"not reached in N" with N its last round. The other columns come from the run's config.yaml.
`--curves DIR` also writes DIR/<run name>.csv (round,test_acc) for each run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

EPS = 1e-6  # test_acc is a float32 ratio (9700/10000 may read 0.96999997); far below one test image (1e-4)
COLUMNS = ("run", "model", "partition", "E", "B", "C", "lr", "server_opt", "rounds to target", "best test_acc seen")


def first_reaching(rows: list[dict], target: float):
    """The first row with test_acc >= target, or None."""
    return next((r for r in rows if r.get("test_acc") is not None and r["test_acc"] >= target - EPS), None)


def server_desc(cfg: dict) -> str:
    opt = cfg.get("server_opt", "none")
    if opt == "none":
        return "none"
    if opt == "fedavgm":
        return f"fedavgm (lr {cfg.get('server_lr')}, momentum {cfg.get('server_momentum')})"
    return f"{opt} (lr {cfg.get('server_lr')}, b1 {cfg.get('server_beta1')}, b2 {cfg.get('server_beta2')}, tau {cfg.get('server_tau')})"


def row_for(run_dir: Path, target: float) -> str:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    hit = first_reaching(rows, target)
    scored = [r["test_acc"] for r in rows if r.get("test_acc") is not None]
    reached = str(hit["round"]) if hit else f"not reached in {rows[-1]['round'] if rows else 0}"
    best = f"{max(scored):.4f}" if scored else "-"
    cells = (run_dir.name, cfg["model"], cfg["partition"], cfg["local_epochs"], cfg["batch_size"], cfg["fraction"],
             cfg["lr"], server_desc(cfg), reached, best)
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--target", type=float, required=True)
    p.add_argument("--no-header", action="store_true")
    p.add_argument("--curves", type=Path, help="write DIR/<run>.csv: round,test_acc")
    args = p.parse_args(argv)
    if args.curves:
        args.curves.mkdir(parents=True, exist_ok=True)
        for run in args.runs:
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            (args.curves / f"{run.name}.csv").write_text("round,test_acc\n" + "".join(
                f"{r['round']},{r['test_acc']:.4f}\n" for r in rows if r.get("test_acc") is not None))
    if not args.no_header:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
    for run in args.runs:
        print(row_for(run, args.target))


if __name__ == "__main__":
    main()
