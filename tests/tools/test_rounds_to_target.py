"""tools/rounds_to_target.py: the first round at the target, float32 ratios, runs that never get there."""
import importlib.util
import json
from pathlib import Path

import yaml

TOOL = Path(__file__).resolve().parents[2] / "tools" / "rounds_to_target.py"
spec = importlib.util.spec_from_file_location("rounds_to_target", TOOL)
rtt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rtt)

CFG = dict(model="2nn", partition="iid", local_epochs=1, batch_size=10, fraction=0.1, lr=0.1, server_opt="none")


def make_run(tmp_path: Path, name: str, accs: list) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(CFG))
    rows = [dict(round=i + 1, test_acc=a) for i, a in enumerate(accs)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_first_round_counts_and_later_dips_do_not(tmp_path):
    run = make_run(tmp_path, "a", [0.5, None, 0.96999997, 0.95, 0.98])  # 9700/10000 as float32
    assert rtt.row_for(run, 0.97).split(" | ")[-2] == "3"


def test_not_reached(tmp_path, capsys):
    run = make_run(tmp_path, "b", [0.5, 0.9699])
    rtt.main([str(run), "--target", "0.97", "--curves", str(tmp_path / "curves")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run |") and "not reached in 2" in out[2] and "0.9699" in out[2]
    assert (tmp_path / "curves" / "b.csv").read_text() == "round,test_acc\n1,0.5000\n2,0.9699\n"
