"""SCAFFOLD's control variates in a checkpoint's files: read back when present, one named error when not."""
import pytest
import torch

from fedmpi.runtime.checkpoint import CheckpointError, load_main, load_momentum

P = 5


def write(path, obj):
    torch.save(obj, path)


def test_the_server_control_is_read_back_and_its_absence_named(tmp_path):
    write(tmp_path / "main.pt", {"main": torch.zeros(P), "server": {}, "control": torch.arange(5.0)})
    _, state = load_main(tmp_path, torch.zeros(P), (), control=True)
    assert torch.equal(state["control"], torch.arange(5.0))
    write(tmp_path / "main.pt", {"main": torch.zeros(P), "server": {}})
    with pytest.raises(CheckpointError, match=r"main.pt lacks 'control'"):
        load_main(tmp_path, torch.zeros(P), (), control=True)
    write(tmp_path / "main.pt", {"main": torch.zeros(P), "server": {}, "control": torch.zeros(P + 1)})
    with pytest.raises(CheckpointError, match=r"main.pt: 'control'"):
        load_main(tmp_path, torch.zeros(P), (), control=True)


def test_node_controls_are_read_by_key_and_a_file_without_them_is_refused(tmp_path):
    meta = {"node_files": ["nodes-0-2.pt"]}
    like = torch.zeros(2, P)
    write(tmp_path / "nodes-0-2.pt", {"first": 0, "momentum": torch.zeros(2, P), "control": torch.ones(2, P)})
    assert torch.equal(load_momentum(tmp_path, meta, 0, 2, like, "control", 2), torch.ones(2, P))
    write(tmp_path / "nodes-0-2.pt", {"first": 0, "momentum": torch.zeros(2, P)})
    with pytest.raises(CheckpointError, match=r"nodes-0-2.pt is corrupt: not a dict with 'first': 0 and 'control'"):
        load_momentum(tmp_path, meta, 0, 2, like, "control", 2)
