"""Config files as hostile input: each refused with one ConfigError naming the file, quickly, in bounded memory."""
import os
import threading
import time

import pytest

from fedmpi.config import load_config
from fedmpi.configfile import MAX_CONFIG_BYTES, MAX_DEPTH, parse_config_text, read_config_file
from fedmpi.errors import ConfigError

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)) + "lr: *i\n"


def refused(path, message):
    start = time.monotonic()
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(str(path))
    assert time.monotonic() - start < 30  # a hang guard only: these take milliseconds
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
    return str(caught.value)


def test_aliases_are_refused_before_they_expand(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    assert str(bomb) in refused(bomb, r"line 1: YAML anchors and aliases \(&name, \*name\) are not allowed")
    (tmp_path / "alias.yaml").write_text("lr: 0.1\nmomentum: *undefined\n")
    refused(tmp_path / "alias.yaml", "line 2: YAML anchors and aliases")
    (tmp_path / "anchor.yaml").write_text("lr: &x 0.1\n")
    refused(tmp_path / "anchor.yaml", "line 1: YAML anchors and aliases")


@pytest.mark.parametrize("text", ["lr: " + "[" * 20000 + "]" * 20000 + "\n", "lr: " + "{a: " * 12000 + "}" * 12000,
                                  "- " * 20000 + "x\n", "lr: [[[1]]]\n", "a:\n b:\n  c:\n   d: 1\n"])
def test_deep_nesting_is_refused_without_recursion(tmp_path, text):
    job = tmp_path / "deep.yaml"
    job.write_text(text)
    # libyaml stops a flow collection at its own nesting limit while scanning ahead; either way one line.
    refused(job, f"nested deeper than {MAX_DEPTH} levels|is not valid YAML: while increasing flow level")


def test_a_value_nested_within_the_cap_reaches_its_keys_type_check(tmp_path):
    job = tmp_path / "list.yaml"
    job.write_text("lr: [0.1, 0.2]\n")
    refused(job, r"config key 'lr' must be a number, got \['0.1', '0.2'\]")


def test_a_file_that_is_not_utf8_is_refused_with_the_byte_and_line(tmp_path):
    job = tmp_path / "latin1.yaml"
    job.write_bytes("lr: 0.1\ndata_dir: /home/j\u00f6rg\n".encode("latin-1"))
    refused(job, r"is not UTF-8 text: byte 0xf6 on line 2")


def test_a_utf8_file_with_a_byte_order_mark_is_read(tmp_path):
    job = tmp_path / "bom.yaml"
    job.write_bytes("\ufefflr: 0.5\ndata_dir: /home/j\u00f6rg\n".encode("utf-8"))
    cfg = load_config(str(job))
    assert (cfg.lr, cfg.data_dir) == (0.5, "/home/j\u00f6rg")


def test_a_huge_file_is_refused_by_its_size_without_reading_it(tmp_path):
    job = tmp_path / "huge.yaml"
    with open(job, "wb") as f:
        f.truncate(1 << 40)  # sparse: 1 TiB that would take hours to parse
    refused(job, r"is 1,099,511,627,776 bytes, more than the 64 KiB")
    (tmp_path / "just.yaml").write_text("#" * (MAX_CONFIG_BYTES - 1) + "\n")
    assert load_config(str(tmp_path / "just.yaml")).lr == 0.01  # the cap itself is fine


def test_directories_devices_and_fifos_are_refused_before_opening(tmp_path):
    refused(tmp_path, "is a directory, not a regular file")
    refused("/dev/zero", "is a character device, not a regular file")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(refused(fifo, r"is a FIFO \(named pipe\)")), daemon=True)
    reader.start()
    reader.join(30)
    assert outcome, "reading a FIFO blocked"


def test_a_symlink_to_a_regular_file_is_read(tmp_path):
    (tmp_path / "real.yaml").write_text("lr: 0.25\n")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "real.yaml")
    assert load_config(str(tmp_path / "link.yaml")).lr == 0.25


@pytest.mark.parametrize("text,message", [
    ("lr: !!python/object/apply:os.system ['touch PWNED']\n", "YAML tag 'tag:yaml.org,2002:python/object/apply"),
    ("lr: !!binary aGVsbG8=\n", "YAML tag 'tag:yaml.org,2002:binary' is not allowed"),
    ("lr: !custom 1\n", "YAML tag '!custom' is not allowed"),
    ("lr: 0.1\nlr: 0.2\n", r"line 2: key 'lr' is given twice \(first on line 1\)"),
    ("? [a, b]\n: 1\n", "a config key must be a plain word"),
    ("lr: 0.1\n---\nlr: 0.2\n", r"line 2: a second YAML document \(---\)"),
    ("lr: [0.1,\n", "is not valid YAML"),
    ("lr: 0.1\x00\n", "is not valid YAML"),
    ("seed: !!int " + "9" * 5000 + "\n", "a value cannot be read"),
])
def test_yaml_features_a_config_does_not_need_are_refused(tmp_path, text, message):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    refused(job, message)
    assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")


def test_plain_scalars_stay_text_for_the_keys_to_read():
    assert parse_config_text("a: 010\nb: yes\nc: 1e-3\nd: 2001-12-14\ne:\nf: ~\ng: 'null'\n", "t") == {
        "a": "010", "b": "yes", "c": "1e-3", "d": "2001-12-14", "e": None, "f": None, "g": "null"}


def test_reading_is_bounded_even_when_the_file_grows_after_the_check(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("lr: 0.1\n")
    assert read_config_file(str(job)) == "lr: 0.1\n"
