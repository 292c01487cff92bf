"""Print the tutorial's comparison table (main model vs centralized, per round) from a run directory.

    python tools/tutorial_table.py runs/mnist
"""
import json
import sys
from pathlib import Path


def main(run_dir: str) -> None:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    print("| round | main model test acc | local models (mean on local splits) | main on local splits | centralized | round time (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['round']} | {r['test_acc']:.4f} | {r['local_acc_mean']:.4f} | {r['main_on_local_acc_mean']:.4f} "
              f"| {r['central_acc']:.4f} | {r['t_round']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/mnist")
