import numpy as np
import pytest
import torch

from fedmpi.fl.aggregate import UpdateSum, apply_update, node_weights, summed_update, trailer, wire_bytes_estimate


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


@pytest.mark.parametrize("ranks,expected", [(1, 0), (2, 1000), (4, 1500), (16, 1875)])
def test_ring_wire_bytes_estimate(ranks, expected):
    assert wire_bytes_estimate(1000, ranks) == expected
