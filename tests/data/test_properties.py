"""Property tests: random sizes, labels and corruptions give a valid result or fedmpi's own error, nothing else."""
import re
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from shardfiles import make_valid

from fedmpi.data.partition import balanced, iid, node_ranges
from fedmpi.data.shards import GROUPS, read_nodes, read_test
from fedmpi.data.validate import validate_shards
from fedmpi.errors import ConfigError, DataError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- partitioners ---------------------------------------------------------------------------------------

@st.composite
def split_args(draw):
    classes = draw(st.integers(1, 6))
    labels = np.array(draw(st.lists(st.integers(0, classes - 1), max_size=120)), dtype=np.int64)
    return (labels, draw(st.integers(1, 12)), draw(st.integers(0, 15)), classes, draw(st.integers(0, 2**32 - 1)),
            draw(st.booleans()))


def assert_valid_split(parts, labels, nodes, per_node, allow_reuse):
    assert len(parts) == nodes
    for part in parts:
        assert len(part) == per_node and part.dtype.kind in "iu"
        assert ((0 <= part) & (part < len(labels))).all()
    everything = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if not allow_reuse:
        assert len(np.unique(everything)) == len(everything)  # no sample in two nodes, nor twice in one


@SETTINGS
@given(split_args())
def test_balanced_gives_equal_label_counts_or_a_config_error(args):
    labels, nodes, per_node, classes, seed, allow_reuse = args
    try:
        parts = balanced(labels, nodes, per_node, classes, seed, allow_reuse=allow_reuse)
    except ConfigError:
        return
    assert_valid_split(parts, labels, nodes, per_node, allow_reuse)
    for part in parts:
        assert np.bincount(labels[part], minlength=classes).tolist() == [per_node // classes] * classes


@SETTINGS
@given(split_args())
def test_iid_gives_equal_disjoint_parts_or_a_config_error(args):
    labels, nodes, per_node, classes, seed, allow_reuse = args
    try:
        parts = iid(labels, nodes, per_node, classes, seed, allow_reuse=allow_reuse)
    except ConfigError:
        return
    assert_valid_split(parts, labels, nodes, per_node, allow_reuse)


@SETTINGS
@given(st.integers(1, 200), st.integers(1, 64))
def test_node_ranges_cover_every_node_once_in_blocks_differing_by_one_or_refuse(nodes, ranks):
    try:
        blocks = node_ranges(nodes, ranks)
    except ConfigError:
        assert ranks > nodes
        return
    assert [n for b in blocks for n in b] == list(range(nodes))
    sizes = [len(b) for b in blocks]
    assert len(sizes) == ranks and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@SETTINGS
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=100), st.integers(1, 16))
def test_blocks_by_sample_count_cover_every_node_and_no_rank_holds_much_more_than_its_share(sizes, ranks):
    nodes, offsets = len(sizes), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    try:
        blocks = node_ranges(nodes, ranks, offsets)
    except ConfigError:
        assert ranks > nodes
        return
    assert [n for b in blocks for n in b] == list(range(nodes)) and all(len(b) >= 1 for b in blocks)
    total = offsets[-1]
    for b in blocks:  # beyond its share by at most the one node that crosses a cut (or the forced one-node blocks)
        work = offsets[b.stop] - offsets[b.start]
        assert work <= -(-total // ranks) + 2 * max(sizes) or len(b) == 1


# --- the shard file: random valid files, random corruptions ---------------------------------------------

def load_everything(path):
    """What a run reads, checked for what a run relies on: validate, every node of both groups, the test set."""
    attrs = validate_shards(path)
    shape, classes, nodes = tuple(attrs["input_shape"]), attrs["classes"], attrs["num_nodes"]
    for group in GROUPS:
        block = read_nodes(path, group, 0, nodes)
        assert len(block.counts) == nodes and block.x.shape == (block.offsets[-1], *shape)
        assert ((0 <= block.y) & (block.y < classes)).all()
        if group == "train":
            assert (block.counts > 0).all()
    x, y = read_test(path)
    assert len(x) == len(y) > 0 and x.shape[1:] == shape and ((0 <= y) & (y < classes)).all()


@st.composite
def shard_sizes(draw):
    return dict(nodes=draw(st.integers(1, 5)), per_node=draw(st.integers(1, 6)), test_per_node=draw(st.integers(0, 3)),
                classes=draw(st.integers(1, 4)), shape=tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))),
                seed=draw(st.integers(0, 1000)))


@SETTINGS
@given(shard_sizes())
def test_every_valid_file_of_any_size_loads(sizes):
    with tempfile.TemporaryDirectory() as tmp:
        load_everything(make_valid(Path(tmp) / "s.h5", **sizes))


DATASETS = ["train/x", "train/y", "train/offsets", "local_test/x", "local_test/y", "local_test/offsets",
            "test/x", "test/y"]
ATTRS = ["format_version", "dataset", "partition", "seed", "num_nodes", "classes", "input_shape",
         "samples_per_node", "test_per_node", "pixel_scale"]
VALUES = st.one_of(st.integers(-3, 10), st.floats(allow_nan=True), st.text(max_size=3), st.booleans(),
                   st.lists(st.integers(-1, 4), max_size=4).map(lambda v: np.array(v, dtype=np.int64)))
ARRAYS = st.tuples(st.sampled_from([np.uint8, np.int64, np.int32, np.float32, np.uint16]),
                   st.lists(st.integers(0, 4), min_size=0, max_size=4))

# One corruption: (kind, parameters drawn for it).
CORRUPTION = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("bytes"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("element"), st.tuples(st.sampled_from(DATASETS), st.floats(0, 1), st.integers(-5, 300))),
    st.tuples(st.just("replace"), st.tuples(st.sampled_from(DATASETS), ARRAYS)),
    st.tuples(st.just("delete"), st.sampled_from(DATASETS + ATTRS)),
    st.tuples(st.just("attr"), st.tuples(st.sampled_from(ATTRS), VALUES)),
)


def corrupt(path, kind, params):
    """Apply one drawn corruption to the file at `path`."""
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[:int(params * len(data))])
    elif kind == "bytes":
        data = bytearray(path.read_bytes())
        for where, value in params if data else []:
            data[min(int(where * len(data)), len(data) - 1)] = value
        path.write_bytes(bytes(data))
    else:
        with h5py.File(path, "r+") as f:
            edit(f, kind, params)


def edit(f, kind, params):
    if kind == "element":
        name, where, value = params
        d = f[name]
        if d.size:
            flat = d[...].reshape(-1)
            flat[min(int(where * flat.size), flat.size - 1)] = value  # wraps for uint8, as a bit flip would
            d[...] = flat.reshape(d.shape)
    elif kind == "replace":
        name, (dtype, shape) = params
        del f[name]
        f.create_dataset(name, data=np.ones(shape, dtype=dtype))
    elif kind == "delete":
        del (f.attrs if params in ATTRS else f)[params]
    else:
        name, value = params
        f.attrs[name] = value


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shard_sizes(), st.lists(CORRUPTION, min_size=1, max_size=3))
def test_a_corrupted_file_loads_validly_or_raises_data_error_and_nothing_else(sizes, corruptions):
    with tempfile.TemporaryDirectory() as tmp:
        path = make_valid(Path(tmp) / "s.h5", **sizes)
        for kind, params in corruptions:
            try:
                corrupt(path, kind, params)
            except (OSError, KeyError, ValueError, TypeError, OverflowError, RuntimeError):
                break  # the file is already too broken for h5py to edit further: test it as it is
        try:
            load_everything(path)
            event("loaded a valid shard")
        except DataError as err:
            assert "\n" not in str(err) and str(path) in str(err)
            event("DataError: " + re.sub(r"\[\d+\]", "", str(err).split(": ", 1)[-1].split(" ")[0]))  # which check


@pytest.mark.parametrize("value", [np.int64(-1), np.int64(7)])
def test_a_single_bad_label_anywhere_is_found(tmp_path, value):
    path = make_valid(tmp_path / "s.h5", nodes=3, per_node=4, classes=3)
    with h5py.File(path, "r+") as f:
        f["local_test/y"][-1] = value
    with pytest.raises(DataError, match=rf"/local_test/y\[5\] = {value} is outside"):
        load_everything(path)
