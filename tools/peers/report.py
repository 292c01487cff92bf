"""The peer benchmark's arithmetic and tables: the round order, medians over rounds 2+, paired ratios, the table.

Pure functions of the per-round records, so they are tested alone (tests/tools/test_peers_report.py).
A contender's result is a dict: name, peer, semantics, rounds {round: {"seconds", "test_acc"}}, and
rss_sum_mib / rss_max_mib / processes (its process tree's peak RSS), status ("ok" or why it stopped).
"""
from __future__ import annotations

import math
import statistics
from typing import Optional


def schedule(names: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, contender) in run order: A B C D in odd rounds, D C B A in even ones, so that neither
    end of the list always runs first after a pause and a slow spell lands on both directions."""
    order = []
    for rnd in range(1, rounds + 1):
        order += [(rnd, name) for name in (names if rnd % 2 else names[::-1])]
    return order


def steady_rounds(rounds: dict[int, dict]) -> list[int]:
    """Rounds 2+ (round 1 carries first-touch costs), or round 1 when it is all there is."""
    later = sorted(r for r in rounds if r >= 2)
    return later or sorted(rounds)


def summarize(rounds: dict[int, dict]) -> Optional[dict]:
    """Median, min, max and count of the seconds of the steady rounds; None without rounds."""
    secs = [rounds[r]["seconds"] for r in steady_rounds(rounds)]
    if not secs:
        return None
    return dict(median=statistics.median(secs), low=min(secs), high=max(secs), n=len(secs))


def paired_ratio(ref: dict[int, dict], other: dict[int, dict]) -> Optional[float]:
    """Median over the steady rounds both ran of ref seconds / other seconds (below 1: `other` is slower).
    Each pair ran back to back in one cycle of the schedule, so a slow spell tends to hit both."""
    common = [r for r in steady_rounds(ref) if r in other]
    if not common:
        return None
    return statistics.median(ref[r]["seconds"] / other[r]["seconds"] for r in common)


def fastest(results: list[dict], peer: str) -> Optional[str]:
    """Name of the finished `peer` contender with the lowest median s/round (None if none finished)."""
    timed = [(summarize(c["rounds"])["median"], c["name"]) for c in results if c["peer"] == peer and c["rounds"]]
    return min(timed)[1] if timed else None


def accuracy_gap(a: dict[int, dict], b: dict[int, dict]) -> Optional[float]:
    """Largest |test accuracy difference| over the rounds both ran."""
    common = [r for r in a if r in b]
    if not common:
        return None
    return max(abs(a[r]["test_acc"] - b[r]["test_acc"]) for r in common)


def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def row(c: dict, ref: Optional[dict], marks: dict[str, str]) -> str:
    """One markdown table row of contender `c`."""
    s = summarize(c["rounds"])
    timing = "-" if s is None else f"{s['median']:.2f} ({s['low']:.2f}-{s['high']:.2f}, {s['n']})"
    ratio = paired_ratio(ref["rounds"], c["rounds"]) if ref and c["rounds"] else None
    rss = "-" if c.get("rss_sum_mib") is None else \
        f"{c['rss_sum_mib']:.0f} ({c.get('processes', 0)} proc., largest {c['rss_max_mib']:.0f})"
    accs = " ".join(_num(c["rounds"][r]["test_acc"], ".4f") for r in sorted(c["rounds"])) or "-"
    status = "" if c.get("status", "ok") == "ok" else f" ({c['status'].split(';')[0]})"   # the why, not the log
    return (f"| {c['name']}{marks.get(c['name'], '')}{status} | {c['semantics']} | {timing} | {_num(ratio, '.2f')} "
            f"| {rss} | {accs} |")


def table(results: list[dict], ref_name: str) -> str:
    """The markdown table of every contender, ratios against `ref_name`, each peer's fastest marked."""
    ref = next((c for c in results if c["name"] == ref_name and c["rounds"]), None)
    marks = {name: " **(fastest)**" for peer in {c["peer"] for c in results if c["peer"] != "fedmpi"}
             for name in [fastest(results, peer)] if name and sum(c["peer"] == peer for c in results) > 1}
    head = ["| contender | semantics | s/round, median (min-max, rounds) | vs " + ref_name +
            " | peak RSS MiB, all processes | test acc per round |", "|---|---|---:|---:|---:|---|"]
    return "\n".join(head + [row(c, ref, marks) for c in results])


def summary_lines(results: list[dict], ref_name: str, acc_ref_name: str) -> list[str]:
    """Speed-ups of `ref_name` over each peer's fastest setting; accuracy gaps to `acc_ref_name`."""
    ref = next((c for c in results if c["name"] == ref_name and c["rounds"]), None)
    if ref is None:
        return [f"{ref_name} has no rounds: no ratios"]
    lines = []
    for peer in sorted({c["peer"] for c in results} - {"fedmpi"}):
        name = fastest(results, peer)
        if name is None:
            lines.append(f"{peer}: no finished rounds")
            continue
        other = next(c for c in results if c["name"] == name)
        ratio = paired_ratio(other["rounds"], ref["rounds"])
        lines.append(f"{ref_name} is {_num(ratio, '.2f')}x as fast as {name}, {peer}'s fastest setting here "
                     f"(median of per-round pairs, rounds 2+)")
    acc_ref = next((c for c in results if c["name"] == acc_ref_name and c["rounds"]), ref)
    gaps = [(c["name"], accuracy_gap(acc_ref["rounds"], c["rounds"])) for c in results if c is not acc_ref]
    shown = [f"{name} {gap * 100:.2f}" for name, gap in gaps if gap is not None]
    if shown:
        lines.append(f"test accuracy, largest gap to {acc_ref['name']} in any round (pp): " + ", ".join(shown))
    return lines
