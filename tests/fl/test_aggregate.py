import numpy as np
import pytest
import torch

from fedmpi.fl.aggregate import (
    INTERRUPTED,
    UpdateSum,
    Wire,
    apply_update,
    node_weights,
    round_abandoned,
    summed_total,
    summed_update,
    trailer,
    unclipped_count,
    wire_bytes_estimate,
)
from fedmpi.fl.compress import UNIT_ROUNDOFF, bf16_add_into, decode, fp16_add_into


def test_node_weights():
    assert node_weights("mean", np.array([10, 30])).tolist() == [1.0, 1.0]
    assert node_weights("weighted", np.array([10, 30])).tolist() == [10.0, 30.0]


def test_plain_mean_of_three_nodes_split_over_two_ranks_by_hand():
    main = torch.tensor([1.0, 2.0])
    # Node models (1, 4), (3, 2), (5, 0): the plain mean is (3, 2).
    rank_a, rank_b = UpdateSum(main), UpdateSum(main)
    rank_a.add(torch.tensor([[1.0, 4.0], [3.0, 2.0]]), np.array([1.0, 1.0]))
    rank_b.add(torch.tensor([[5.0, 0.0]]), np.array([1.0]))
    buf_a, buf_b = rank_a.pack(), rank_b.pack()
    # Updates relative to main: (0, 2) + (2, 0) = (2, 2) with weight 2; (4, -2) with weight 1.
    assert buf_a.tolist() == [2.0, 2.0, 2.0, 0, 0] and buf_b.tolist() == [4.0, -2.0, 1.0, 0, 0]
    reduced = buf_a + buf_b  # what Allreduce(SUM) computes
    assert apply_update(main, reduced).tolist() == [3.0, 2.0]


def test_weighted_mean_by_sample_count_by_hand():
    main = torch.zeros(1)
    total = UpdateSum(main)
    total.add(torch.tensor([[1.0], [4.0]]), node_weights("weighted", np.array([30, 10])))
    # (30 * 1 + 10 * 4) / 40 = 1.75
    assert apply_update(main, total.pack()).tolist() == [1.75]


def test_payload_is_float32_params_plus_a_three_value_trailer():
    buf = UpdateSum(torch.zeros(199210)).pack()
    assert buf.dtype == np.float32 and buf.nbytes == 4 * 199210 + 12


def test_on_a_cpu_the_running_sum_is_the_payload_so_packing_copies_nothing():
    total = UpdateSum(torch.zeros(3))
    total.add(torch.tensor([[1.0, 2.0, 3.0]]), np.array([2.0]))
    buf = total.pack(dropped=1)
    assert np.shares_memory(buf, total.total.numpy()) and buf.tolist() == [2.0, 4.0, 6.0, 2.0, 1.0, 0.0]
    total.add(torch.zeros(0, 3), np.zeros(0))  # a chunk whose nodes all diverged adds nothing
    assert total.weight == 2.0


def test_summed_update_leaves_the_division_to_the_consumer():
    reduced = np.array([2.0, 4.0, 4.0, 0, 0], dtype=np.float32)
    update, scale = summed_update(reduced)
    assert update.tolist() == [2.0, 4.0] and scale == 0.25
    assert np.shares_memory(update.numpy(), reduced)  # a view: no pass over the buffer yet


def test_trailer_sums_dropped_nodes_and_stop_votes_over_ranks():
    main = torch.zeros(2)
    a, b, c = UpdateSum(main), UpdateSum(main), UpdateSum(main)
    a.add(torch.ones(1, 2), np.array([1.0]))
    reduced = a.pack(dropped=2, stop=False) + b.pack(dropped=1, stop=True) + c.pack()
    assert trailer(reduced) == (1.0, 3, True)
    assert trailer(a.pack() + c.pack()) == (1.0, 0, False)


def test_zero_total_weight_is_an_error():
    with pytest.raises(ValueError, match="total weight is zero"):
        apply_update(torch.zeros(2), np.zeros(5, np.float32))


def half_sum(bufs, dtype):
    """A half-precision Allreduce(SUM) of the ranks' buffers: one rounding per add."""
    acc = np.array(bufs[0]).view(np.uint16).copy()
    for b in bufs[1:]:
        (fp16_add_into if dtype == "fp16" else bf16_add_into)(np.array(b).view(np.uint16), acc)
    return acc.view(np.float16) if dtype == "fp16" else acc


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compressed_mean_of_the_kept_nodes_when_a_rank_dropped_its_two_by_hand(dtype):
    """4 nodes selected (weight 1 each, W = 4); rank A keeps (1, 2) and (3, 2), rank B drops both of its.
    A sends (4, 4) / W = (1, 1) and the share 2 / W = 0.5; B zeros, share 0 and a count of 2. The
    kept nodes' mean is (2, 2): the buffer's (1, 1) rescaled by 1 / 0.5. Every value is exact in both."""
    main = torch.zeros(2)
    a, b = UpdateSum(main), UpdateSum(main)
    a.add(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), np.ones(2))
    wires = [Wire(dtype, ranks=2, rank=r, most_nodes=2) for r in (0, 1)]
    assert wires[0].tail == 3  # share, one digit slot, stop
    reduced = half_sum([a.pack(0, False, wires[0], 4.0), b.pack(2, True, wires[1], 4.0)], dtype)
    assert decode(reduced, dtype).tolist() == [1.0, 1.0, 0.5, 2.0, 1.0]
    assert trailer(reduced, wires[0]) == (0.5, 2, True)
    update, scale = summed_update(reduced, wires[1])
    assert (scale * update).tolist() == [2.0, 2.0]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compressed_weighted_mean_without_the_dropped_node_stays_within_the_codecs_rounding(dtype):
    """Weights 30, 10, 20 (W = 60); the 20 dropped: mean (30 x 1 + 10 x 4) / 40 = 1.75 per value.
    The share 40/60 and the values 0.5, 0.6667 are not exact in half precision: a few roundings."""
    main = torch.zeros(3)
    a, b = UpdateSum(main), UpdateSum(main)
    a.add(torch.ones(1, 3), np.array([30.0]))
    b.add(torch.full((1, 3), 4.0), np.array([10.0]))
    wires = [Wire(dtype, ranks=2, rank=r, most_nodes=2) for r in (0, 1)]
    reduced = half_sum([a.pack(0, False, wires[0], 60.0), b.pack(1, False, wires[1], 60.0)], dtype)
    weight, dropped, stop = trailer(reduced, wires[0])
    assert dropped == 1 and not stop and abs(weight - 2 / 3) <= 2 * UNIT_ROUNDOFF[dtype]
    update, scale = summed_update(reduced, wires[0])
    assert np.allclose((scale * update).numpy(), 1.75, rtol=6 * UNIT_ROUNDOFF[dtype], atol=0)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_without_a_dropped_node_the_compressed_buffer_is_the_mean_as_it_stands(dtype):
    """Weights 1, 4, 2 on three ranks: the shares 1/7, 4/7, 2/7 round so that their half-precision sum
    is not 1 (0.99951 in fp16, 0.99609 in bf16). Nothing dropped, so nothing may be rescaled by it."""
    main = torch.zeros(2)
    sums = [UpdateSum(main) for _ in range(3)]
    for total, w in zip(sums, (1.0, 4.0, 2.0)):
        total.add(torch.full((1, 2), 7.0), np.array([w]))  # every node's update is 7: the mean is 7
    bufs = [total.pack(0, False, Wire(dtype, 3, r, 1), 7.0) for r, total in enumerate(sums)]
    reduced = half_sum(bufs, dtype)
    assert trailer(reduced, Wire(dtype, 3, 0, 1))[0] < 1.0  # the case is real
    update, scale = summed_update(reduced, Wire(dtype, 3, 0, 1))
    assert scale == 1.0 and np.allclose(update.numpy(), 7.0, rtol=3 * UNIT_ROUNDOFF[dtype], atol=0)


def test_a_dropped_count_beyond_bf16s_exact_integers_reads_exactly_from_the_trailer():
    """100 + 100 + 101 = 301 dropped nodes; one bf16 slot would read 300."""
    wires = [Wire("bf16", ranks=3, rank=r, most_nodes=101) for r in range(3)]
    assert wires[0].tail == 4  # share, two digit slots (base 86), stop
    main = torch.zeros(1)
    reduced = half_sum([UpdateSum(main).pack(n, False, w, 400.0) for n, w in zip((100, 100, 101), wires)], "bf16")
    assert trailer(reduced, wires[2]) == (0.0, 301, False)


@pytest.mark.parametrize("ranks,expected", [(1, 0), (2, 1000), (4, 1500), (16, 1875)])
def test_ring_wire_bytes_estimate(ranks, expected):
    assert wire_bytes_estimate(1000, ranks) == expected


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_the_unclipped_count_travels_exactly_before_the_stop_vote_which_stays_last(dtype):
    """Three ranks with 300 nodes each (past bf16's exact integers): dropped 1 + 0 + 2, unclipped 250 + 299 + 7;
    the clipped updates sum with their clip factors; rank 2's INTERRUPTED vote stays readable in the last slot."""
    main = torch.zeros(2)
    sums = [UpdateSum(main, Wire(dtype, 3, r, 300, unclipped=True)) for r in range(3)]
    sums[0].add(torch.tensor([[3.0, 4.0]]), np.ones(1), scale=torch.tensor([0.5]))
    wires = [Wire(dtype, 3, r, 300, unclipped=True) for r in range(3)]
    bufs = [s.pack(d, 0.0, w, 4.0, u) for s, w, d, u in zip(sums, wires, (1, 0, 2), (250, 299, 7))]
    reduced = bufs[0] + bufs[1] + bufs[2] if dtype == "fp32" else half_sum(bufs, dtype)
    assert unclipped_count(reduced, wires[0]) == 556 and trailer(reduced, wires[0])[1:] == (3, False)
    assert summed_total(reduced, wires[0], 4.0).tolist() == [1.5, 2.0]
    bufs[2] = sums[2].pack(2, INTERRUPTED, wires[2], 4.0, 7)
    reduced = bufs[0] + bufs[1] + bufs[2] if dtype == "fp32" else half_sum(bufs, dtype)
    assert round_abandoned(reduced, wires[0]) and unclipped_count(reduced, wires[0]) == 556
