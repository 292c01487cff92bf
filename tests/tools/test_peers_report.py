"""tools/peers: the peer benchmark's round order, medians, paired ratios, table, layouts and record parsing."""
import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from peers import contenders, report  # noqa: E402


def rounds(*secs, accs=None):
    accs = accs or [0.5] * len(secs)
    return {i + 1: dict(seconds=s, test_acc=a) for i, (s, a) in enumerate(zip(secs, accs))}


def result(name, peer, secs, accs=None, **extra):
    return dict(name=name, peer=peer, semantics="sem", rounds=rounds(*secs, accs=accs), status="ok", **extra)


def test_schedule_alternates_direction_each_round():
    assert report.schedule(["A", "B", "C"], 3) == [(1, "A"), (1, "B"), (1, "C"), (2, "C"), (2, "B"), (2, "A"),
                                                   (3, "A"), (3, "B"), (3, "C")]


def test_steady_rounds_leave_out_round_one_unless_it_is_all_there_is():
    assert report.steady_rounds(rounds(9.0, 2.0, 3.0)) == [2, 3]
    assert report.steady_rounds(rounds(9.0)) == [1]
    assert report.summarize({}) is None


def test_summary_is_the_median_and_spread_of_rounds_two_and_later():
    s = report.summarize(rounds(100.0, 4.0, 2.0, 3.0))
    assert s == dict(median=3.0, low=2.0, high=4.0, n=3)


def test_ratio_is_the_median_of_per_round_pairs_not_the_ratio_of_medians():
    ref = rounds(50.0, 1.0, 2.0, 4.0)
    other = rounds(1.0, 2.0, 2.0, 2.0)
    # pairs: 1/2, 2/2, 4/2 -> median 1.0 (medians alone would give 2/2 as well; change one to tell them apart)
    assert report.paired_ratio(ref, other) == pytest.approx(1.0)
    other[4]["seconds"] = 16.0       # pairs 0.5, 1.0, 0.25 -> 0.5; ratio of medians would be 2/2 = 1
    assert report.paired_ratio(ref, other) == pytest.approx(0.5)


def test_ratio_uses_only_rounds_both_ran():
    ref, other = rounds(9.0, 2.0, 2.0), rounds(9.0, 4.0)
    assert report.paired_ratio(ref, other) == pytest.approx(0.5)
    assert report.paired_ratio(ref, {}) is None


def test_fastest_picks_the_lowest_median_of_a_peer_and_ignores_unfinished_ones():
    res = [result("pfl 1x1", "pfl", [9, 8, 8]), result("pfl 2x1", "pfl", [9, 5, 6]),
           dict(result("pfl 1x2", "pfl", []), status="stopped: exited with code 1"),
           result("fedmpi -n 2", "fedmpi", [1, 1, 1])]
    assert report.fastest(res, "pfl") == "pfl 2x1"
    assert report.fastest(res, "flwr") is None


def test_accuracy_gap_is_the_largest_difference_in_a_common_round():
    a = rounds(1, 1, 1, accs=[0.80, 0.90, 0.95])
    b = rounds(1, 1, accs=[0.81, 0.88])
    assert report.accuracy_gap(a, b) == pytest.approx(0.02)


def test_table_rows_carry_ratio_rss_accuracy_and_mark_each_peers_fastest():
    res = [result("fedmpi -n 2", "fedmpi", [9, 2, 2], accs=[0.8, 0.9, 0.93], rss_sum_mib=1500.0, rss_max_mib=790.0,
                  processes=4),
           result("pfl 1x1", "pfl", [9, 8, 8]), result("pfl 2x1", "pfl", [9, 4, 4]),
           dict(result("flwr 2x1", "flwr", [30]), status="stopped: no progress in 60 s; last output: INFO x")]
    lines = report.table(res, "fedmpi -n 2").splitlines()
    assert lines[0].startswith("| contender | semantics |") and lines[1].startswith("|---")
    ref_row, slow, fast, failed = lines[2:]
    assert "| 2.00 (2.00-2.00, 2) | 1.00 | 1500 (4 proc., largest 790) | 0.8000 0.9000 0.9300 |" in ref_row
    assert "| 0.25 |" in slow and "(fastest)" not in slow
    assert fast.startswith("| pfl 2x1 **(fastest)** |") and "| 0.50 |" in fast
    assert failed.startswith("| flwr 2x1 (stopped: no progress in 60 s) |") and "| 30.00 (30.00-30.00, 1) |" in failed


def test_summary_lines_state_the_speedup_over_each_peers_fastest_and_accuracy_gaps():
    res = [result("fedmpi -n 2", "fedmpi", [9, 2, 2], accs=[0.8, 0.9, 0.93]),
           result("pfl 2x1", "pfl", [9, 5, 6], accs=[0.8, 0.89, 0.93])]
    lines = report.summary_lines(res, "fedmpi -n 2", "fedmpi -n 2")
    assert lines[0].startswith("fedmpi -n 2 is 2.75x as fast as pfl 2x1")  # pairs 5/2, 6/2 -> 2.75
    assert lines[1].endswith("pfl 2x1 1.00")


def test_layouts_parse_and_bad_ones_name_the_text():
    assert contenders.layout("2x1") == (2, 1)
    for bad in ("2", "x1", "0x1", "2x0", "axb", "2x1x1"):
        with pytest.raises(ValueError, match=repr(bad)):
            contenders.layout(bad)


def test_flower_layout_beyond_the_cores_is_refused(tmp_path):
    w = contenders.Workload("2nn", 1, 1, tmp_path / "f.h5", tmp_path / "i.pt", tmp_path, tmp_path, "cpu")
    with pytest.raises(ValueError, match="at most 2"):
        contenders.flwr(w, tmp_path / "bin" / "python", 2, 2, cores=2)
    one = contenders.flwr(w, tmp_path / "bin" / "python", 1, 1, cores=2)
    assert one.cmd[-2:] == ["--ray-num-cpus", "1"]   # Ray would start 2 workers on 2 free CPUs


def test_records_are_read_from_metrics_jsonl_or_json_lines_among_other_output(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(dict(round=r, t_round=r * 1.5, test_acc=0.9)) + "\n"
                                                   for r in (1, 2)))
    fed = contenders.Contender("fedmpi -n 2", "fedmpi", "s", [], run_dir=run_dir)
    assert contenders.read_rounds(fed, tmp_path / "none.log") == {1: dict(seconds=1.5, test_acc=0.9),
                                                                   2: dict(seconds=3.0, test_acc=0.9)}
    log = tmp_path / "peer.log"
    log.write_text('INFO: starting\n{"event": "start", "versions": {"pfl": "0.6.0"}}\n{"round": 1, "seconds": 2.5, '
                   '"test_acc": 0.7}\n{"round": "x"}\n{not json\n{"round": 2, "seconds": 2.0, "test_acc": 0.8}\n')
    peer = contenders.Contender("pfl 2x1", "pfl", "s", [])
    assert contenders.read_rounds(peer, log) == {1: dict(seconds=2.5, test_acc=0.7), 2: dict(seconds=2.0, test_acc=0.8)}
    assert contenders.events(log) == [{"event": "start", "versions": {"pfl": "0.6.0"}}]


def test_log_tail_skips_warnings_and_colour_codes(tmp_path):
    from peers import venvs
    log = tmp_path / "x.log"
    log.write_text("ok line\n\x1b[92mINFO \x1b[0m: sampled 100\nWARNING: Location ignored\n\n")
    assert venvs.tail(log) == "INFO : sampled 100"
    assert venvs.tail(tmp_path / "missing.log") == ""


def test_peer_environment_is_reused_when_its_stamp_matches_and_a_failed_install_is_one_line(tmp_path):
    from peers import venvs
    said = []
    ready = tmp_path / "pfl"
    (ready / "bin").mkdir(parents=True)
    (ready / "bin" / "python").touch()
    (ready / venvs.STAMP).write_text(json.dumps(["pfl==0.6.0"]))
    assert venvs.ensure("pfl", ["pfl==0.6.0"], tmp_path, say=said.append) == ready / "bin" / "python"
    assert said == []
    # A requirement pip cannot parse fails without reaching any index: the peer is left out in one line.
    assert venvs.ensure("flwr", ["flwr[simulation]=="], tmp_path, say=said.append) is None
    assert len(said) == 2 and said[0].startswith("flwr: installing") and said[1].startswith("flwr: left out:")
    assert not (tmp_path / "flwr" / venvs.STAMP).exists()
