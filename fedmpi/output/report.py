"""`fedmpi report`: tables and plots of one or more run directories (accuracy, time split, bytes).

Reads only what a run wrote (metrics.jsonl, run.json, config.yaml), so it works on a finished run,
a run still going, or one copied off a cluster. Writes report.md and accuracy.png, time.png, bytes.png,
accuracy_vs_bytes.png, accuracy_vs_epsilon.png (DP runs), and labels.png (per-node label histograms)
when the run's shard file is at hand.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from ..data.files import clip, reason, remove_quietly
from ..errors import ConfigError
from .records import Run, load_run, shard_path

MAX_BAR_NODES = 1_000  # more nodes: labels.png stacks areas instead of bars
# The per-round time split: the stacked parts sum to the round's wall time on rank 0.
TIME_PARTS = (("compute", "local training (mean over ranks)"), ("wait", "waiting for the slowest rank"),
              ("transfer", "the Allreduce"), ("other", "evaluation, gathering, writing"))


def time_split(row: dict[str, Any]) -> dict[str, float]:
    """compute / wait / transfer / other seconds of one round (other: the rest of the round's wall time)."""
    parts = dict(compute=_num(row.get("t_train_mean")), wait=_num(row.get("t_wait")),
                 transfer=_num(row.get("t_allreduce")))
    parts["other"] = max(0.0, _num(row.get("t_round")) - sum(parts.values()))
    return parts


def bytes_sent(row: dict[str, Any]) -> float:
    """Bytes all ranks send in one round's Allreduce (the ring estimate per rank times the ranks)."""
    return _num(row.get("wire_bytes_est")) * (row.get("ranks") or 1)


def cumulative(values: list[float]) -> list[float]:
    """Running totals of `values`."""
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return out


def _num(value: Any) -> float:
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run_table(run: Run) -> list[str]:
    """The per-round markdown table of one run."""
    lines = ["| round | main acc | centralized acc | compute (s) | wait (s) | transfer (s) | other (s) "
             "| bytes this round | bytes so far |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    sent = cumulative([bytes_sent(r) for r in run.rows])
    for row, total in zip(run.rows, sent):
        t = time_split(row)
        lines.append(f"| {row['round']} | {_fmt(row.get('test_acc'), '.4f')} | {_fmt(row.get('central_acc'), '.4f')} "
                     f"| {t['compute']:.3f} | {t['wait']:.3f} | {t['transfer']:.4f} | {t['other']:.3f} "
                     f"| {_bytes(bytes_sent(row))} | {_bytes(total)} |")
    return lines


def wall_time(rows: list[dict[str, Any]]) -> Optional[float]:
    """Seconds from `fedmpi run`'s start (before the shard file and the baseline) to the last round,
    over all the processes of a resumed run: the last row's t_elapsed (None for rows without it)."""
    value = rows[-1].get("t_elapsed") if rows else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summary_table(runs: list[Run]) -> list[str]:
    """One line per run, for comparing runs side by side."""
    lines = ["| run | ranks | rounds | final main acc | centralized acc | wall time (s) | in rounds (s) | compute "
             "| wait | transfer | bytes sent |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        t = {k: sum(time_split(r)[k] for r in run.rows) for k, _ in TIME_PARTS}
        in_rounds = sum(_num(r.get("t_round")) for r in run.rows)
        final = next((r["test_acc"] for r in reversed(run.rows) if r.get("test_acc") is not None), None)
        lines.append(f"| {run.path.name} | {run.ranks or '-'} | {len(run.rows)} | {_fmt(final, '.4f')} "
                     f"| {_fmt(run.rows[-1].get('central_acc'), '.4f')} | {_fmt(wall_time(run.rows), '.2f')} "
                     f"| {in_rounds:.2f} | {_share(t['compute'], in_rounds)} | {_share(t['wait'], in_rounds)} "
                     f"| {_share(t['transfer'], in_rounds)} | {_bytes(sum(bytes_sent(r) for r in run.rows))} |")
    return lines


def _share(part: float, total: float) -> str:
    return f"{part:.2f} s ({100 * part / total:.0f}%)" if total > 0 else f"{part:.2f} s"


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def markdown(runs: list[Run], images: list[str], nodes: tuple = ()) -> str:
    """report.md: the comparison, the plots, each run's setup and per-round table, then the nodes table."""
    out = ["# fedmpi report", "", *summary_table(runs), "",
           "Wall time: from the start of `fedmpi run` (reading the shard file, the centralized baseline) to the "
           "end of the last round, summed over restarts. In rounds: the sum of the rounds' own times (rank 0), "
           "split below (shares of the time in rounds). Time per round: "
           + "; ".join(f"**{k}** = {v}" for k, v in TIME_PARTS) + ". Bytes: what all ranks "
           "send in the Allreduce, estimated for a ring (2 (P-1)/P x payload per rank).", ""]
    out += [f"![{Path(name).stem}]({name})" for name in images] + [""]
    for run in runs:
        cfg, info = run.config, run.info
        library = " ".join(info.get("mpi_library", "MPI library unknown").split())
        out += [f"## {run.label}", "", f"`{run.path}`: {library}; "
                f"hosts {', '.join(info.get('hosts', [])) or '?'}; dataset {cfg.get('dataset', '?')}, "
                f"{cfg.get('nodes', '?')} nodes, model {cfg.get('model', '?')}, {cfg.get('local_epochs', '?')} "
                f"local epochs; payload {_bytes(_num(run.rows[0].get('payload_bytes')))} per rank per round.", "",
                *run_table(run), ""]
    if nodes:  # (shard file, its describe.label_table lines): client ids, sizes, labels of each node
        out += [f"## Nodes of `{nodes[0]}`", "", "```", *nodes[1], "```", ""]
    return "\n".join(out)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display on a cluster node)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("report: matplotlib is not installed (pip install -e '.[report]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(runs: list[Run], path: Path) -> None:
    """Main-model test accuracy per round, each run's centralized baseline as a dashed line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        scored = [r for r in run.rows if r.get("test_acc") is not None]
        # Runs at different rank counts give the same accuracy: shrinking markers keep every run visible.
        ax.plot([r["round"] for r in scored], [r["test_acc"] for r in scored], color=f"C{i}", lw=1.5,
                marker="osD^v<>"[i % 7], ms=max(3, 9 - 2 * i), label=f"{run.label} main model")
    centrals = {}
    for run in runs:
        if run.rows[-1].get("central_acc") is not None:
            centrals.setdefault(run.rows[-1]["central_acc"], []).append(run.path.name)
    for j, (acc, names) in enumerate(centrals.items()):  # one line per distinct baseline, not per run
        which = "" if len(centrals) == 1 else f" ({', '.join(names)})"
        ax.axhline(acc, color="k", ls=("--", ":", "-.")[j % 3], lw=1, label=f"centralized{which}: {acc:.4f}")
    ax.set(xlabel="round", ylabel="test accuracy", title="Main model vs centralized baseline")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_time(runs: list[Run], path: Path) -> None:
    """Per-round wall time stacked into compute / wait / transfer / other, one panel per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(max(6, 4.5 * len(runs)), 4.5), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        rounds = [r["round"] for r in run.rows]
        bottom = [0.0] * len(rounds)
        for i, (part, _) in enumerate(TIME_PARTS):
            height = [time_split(r)[part] for r in run.rows]
            ax.bar(rounds, height, bottom=bottom, color=f"C{i}", label=part)
            bottom = [b + h for b, h in zip(bottom, height)]
        ax.set(xlabel="round", title=run.label)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_ylabel("seconds per round")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(TIME_PARTS), fontsize=8, frameon=False)
    fig.suptitle("Where each round's time went (rank 0 wall time)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend under the panels
    _save(fig, path, layout=False)


def plot_bytes(runs: list[Run], path: Path) -> None:
    """Cumulative bytes all ranks sent in the Allreduce, one line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        sent = cumulative([bytes_sent(r) for r in run.rows])
        ax.plot([r["round"] for r in run.rows], [s / 1e6 for s in sent], "o-", color=f"C{i}", label=run.label)
    ax.set(xlabel="round", ylabel="MB sent, all ranks (ring estimate)", title="Cumulative communication")
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_accuracy_vs_bytes(runs: list[Run], path: Path) -> None:
    """Test accuracy against the bytes one rank has contributed so far: fp16/bf16 runs beside fp32."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        scored = [(b, r) for b, r in zip(cumulative([_num(r.get("payload_bytes")) for r in run.rows]), run.rows)
                  if r.get("test_acc") is not None]
        dtype = run.rows[-1].get("update_dtype", "fp32")
        ax.plot([b / 1e6 for b, _ in scored], [r["test_acc"] for _, r in scored], "o-", color=f"C{i}",
                ms=max(3, 7 - 2 * i), label=f"{run.label}, {dtype}")
    ax.set(xlabel="MB contributed per rank so far (payload)", ylabel="test accuracy",
           title="Accuracy against communication")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def epsilon_points(run: Run) -> list[tuple[float, float]]:
    """(epsilon, test accuracy) of the rounds that report both, finite numbers only."""
    points = []
    for row in run.rows:
        eps, acc = row.get("dp_epsilon"), row.get("test_acc")
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (eps, acc)):
            points.append((float(eps), float(acc)))
    return points


def plot_accuracy_vs_epsilon(runs: list[Run], path: Path) -> None:
    """Test accuracy against epsilon spent so far (DP runs); a run without DP as a dashed line at its last accuracy."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        points = epsilon_points(run)
        if points:
            z = run.info.get("dp_noise_multiplier")
            ax.plot(*zip(*points), "o-", color=f"C{i}", ms=3,
                    label=f"{run.label}" + (f", z = {z:.3g}" if isinstance(z, (int, float)) else ""))
            continue
        scored = [r["test_acc"] for r in run.rows if isinstance(r.get("test_acc"), (int, float))]
        if scored:
            ax.axhline(scored[-1], color=f"C{i}", ls="--", label=f"{run.label}, no DP (epsilon = inf)")
    delta = next((r.info.get("dp_delta") for r in runs if isinstance(r.info.get("dp_delta"), float)), None)
    ax.set(xlabel="epsilon so far" + (f" (delta = {delta:.2g})" if delta else ""), ylabel="test accuracy",
           title="Accuracy against privacy spent")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def node_labels(run: Run) -> Optional[Any]:
    """[nodes, classes] label counts from the run's shard file (checked whole first), or None when it is
    not at hand or too large to plot."""
    from ..data.validate import histogram_fits, label_counts, validate_shards

    path = shard_path(run)
    if path is None or not os.path.lexists(path):
        return None
    attrs = validate_shards(path)
    if not histogram_fits(attrs):
        print(f"report: labels.png left out: {attrs['num_nodes']:,} nodes x {attrs['classes']:,} classes in {path} "
              "are too many to plot", file=sys.stderr)
        return None
    return label_counts(path, attrs)


def first_labels(runs: list[Run]) -> Optional[tuple[Run, Any]]:
    """(run, label counts) of the first run whose shard file is at hand."""
    return next(((run, c) for run in runs if (c := node_labels(run)) is not None), None)


def node_table(run: Run, counts: Any) -> tuple:
    """(shard file, the bounded node table of --describe) for the run whose labels are plotted."""
    from ..data.describe import label_table
    from ..data.shards import read_client_ids, read_offsets

    path = shard_path(run)
    local = read_offsets(path, "local_test")
    return path, label_table(counts, read_client_ids(path), local[1:] - local[:-1])


def plot_labels(run: Run, counts: Any, path: Path) -> None:
    """Per-node label histograms (stacked bars) from [nodes, classes] counts."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7, min(16, 0.12 * len(counts))), 4.5))
    colors = [f"C{label % 10}" for label in range(counts.shape[1])]
    if len(counts) > MAX_BAR_NODES:  # one polygon per label: thousands of clients plot in seconds
        ax.stackplot(range(len(counts)), counts.T, colors=colors, labels=[str(c) for c in range(counts.shape[1])])
    else:
        bottom = counts[:, 0] * 0
        for label in range(counts.shape[1]):
            ax.bar(range(len(counts)), counts[:, label], bottom=bottom, width=1.0, color=colors[label],
                   label=str(label))
            bottom = bottom + counts[:, label]
    partition = run.config.get("partition")
    if run.config.get("dataset") == "file":  # the file says how it was split (e.g. natural: one node per client)
        from ..data.shards import read_attrs
        partition = read_attrs(shard_path(run)).get("partition")
    ax.set(xlabel="node", ylabel="training samples",
           title=f"Labels per node: {clip(str(partition), 40)} partition ({run.path.name})")
    if counts.shape[1] <= 30:  # FEMNIST's 62 labels would fill the figure
        ax.legend(title="label", fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, path)


def _save(fig, path: Path, layout: bool = True) -> None:
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def report(run_dirs: list[str], out: Optional[str] = None) -> Path:
    """Write report.md and the PNGs for the run directories; returns the output directory.

    Everything is read and checked before anything is written: bad input leaves no partial report.
    """
    runs = [load_run(Path(d)) for d in run_dirs]
    labels = first_labels(runs)
    out_dir = Path(out) if out else (runs[0].path if len(runs) == 1 else Path("runs/report"))
    tmp = out_dir / f".report.md.{os.getpid()}.tmp"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = {"accuracy.png": plot_accuracy, "time.png": plot_time, "bytes.png": plot_bytes,
                 "accuracy_vs_bytes.png": plot_accuracy_vs_bytes}
        if any(epsilon_points(run) for run in runs):
            plots["accuracy_vs_epsilon.png"] = plot_accuracy_vs_epsilon
        for name, plot in plots.items():
            plot(runs, out_dir / name)
        if labels is not None:
            plot_labels(*labels, out_dir / "labels.png")
        images = list(plots) + (["labels.png"] if labels is not None else [])
        tmp.write_text(markdown(runs, images, node_table(*labels) if labels is not None else ()) + "\n")
        os.replace(tmp, out_dir / "report.md")
    except OSError as err:
        raise ConfigError(f"report: --out {out_dir}: cannot write there ({reason(err)})") from None
    finally:
        remove_quietly(tmp)
    return out_dir
