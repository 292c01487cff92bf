"""SCAFFOLD's and FedNova's update rules on hand-computed arrays."""
import numpy as np
import torch

from fedmpi.fl.aggregate import UpdateSum, Wire, extra_sum, summed_update
from fedmpi.fl.algorithms import (
    fednova_row_weights,
    fednova_rows,
    fednova_scale,
    local_steps,
    scaffold_correction,
    scaffold_node_controls,
    scaffold_server_control,
)


def test_the_correction_is_the_server_control_minus_each_nodes():
    c = torch.tensor([0.5, 0.5])
    ci = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    assert torch.equal(scaffold_correction(c, ci), torch.tensor([[-0.5, -1.5], [0.5, 0.5]]))


def test_option_two_control_variates_by_hand():
    ci = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    c = torch.tensor([0.5, 0.5])
    main = torch.tensor([1.0, 1.0])
    trained = torch.tensor([[0.5, 1.5], [1.0, 1.0]])
    # node 0: (x - y) / (2 * 0.25) = [1, -1]; delta = [1, -1] - c = [0.5, -1.5]; c_0+ = [1.5, 0.5].
    # node 1 took no step (no data): it keeps c_1 and sends zero.
    new, delta = scaffold_node_controls(ci, c, main, trained, torch.tensor([2, 0]), lr=0.25)
    assert torch.equal(delta, torch.tensor([[0.5, -1.5], [0.0, 0.0]]))
    assert torch.equal(new, torch.tensor([[1.5, 0.5], [3.0, 4.0]]))
    assert torch.equal(ci, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # inputs untouched


def test_steps_divide_the_model_move():
    _, delta = scaffold_node_controls(torch.zeros(1, 1), torch.zeros(1), torch.tensor([1.0]),
                                      torch.tensor([[0.0]]), torch.tensor([4]), lr=0.5)
    assert torch.equal(delta, torch.tensor([[0.5]]))  # 1 / (4 * 0.5)


def test_the_server_control_moves_by_the_delta_sum_over_all_nodes():
    c = torch.tensor([0.5, 0.5])
    out = scaffold_server_control(c, torch.tensor([1.0, -2.0]), nodes=4)
    assert out is c  # in place
    assert torch.equal(c, torch.tensor([0.75, 0.0]))  # (|S|/N) mean = sum / N


def test_local_steps_count_every_epochs_batches():
    assert list(local_steps([0, 1, 10, 11, 40], epochs=2, batch_size=10)) == [0, 2, 2, 4, 8]


def test_fednova_two_nodes_by_hand():
    """main 0; node A (weight 1) moved +2 in 1 step, node B (weight 3) moved +4 in 4 steps.

    Normalized: sum w_i d_i / tau_i = 1*2/1 + 3*4/4 = 5; W = 4; tau_eff = (1*1 + 3*4) / 4 = 13/4;
    step = tau_eff * 5 / W = 65/16 = 4.0625 (FedAvg: (1*2 + 3*4) / 4 = 3.5)."""
    main = torch.zeros(1)
    rows, tally, extra = fednova_rows(np.array([1.0, 3.0]), np.array([10, 40]), epochs=1, batch_size=10)
    assert list(rows) == [1.0, 0.75] and list(tally) == [1.0, 3.0] and extra.tolist() == [[13.0]]
    wire = Wire(extra=1)
    update = UpdateSum(main, wire)
    update.add(torch.tensor([[2.0], [4.0]]), rows, extra, tally)
    buf = update.pack(0, 0.0, wire)
    assert buf.tolist() == [5.0, 13.0, 4.0, 0.0, 0.0]  # [update | sum w tau | weight, dropped, stop]
    total, _ = summed_update(buf, wire)
    assert total.tolist() == [5.0] and extra_sum(buf, wire).tolist() == [13.0]
    assert fednova_scale(4.0, 13.0) * 5.0 == 4.0625


def test_fednova_with_equal_steps_is_the_weighted_mean():
    rows, tally, extra = fednova_rows(np.array([1.0, 3.0]), np.array([20, 20]), epochs=1, batch_size=10)
    step = fednova_scale(float(tally.sum()), float(extra)) * (rows[0] * 2.0 + rows[1] * 4.0)
    assert step == (1 * 2.0 + 3 * 4.0) / 4


def test_a_node_without_steps_adds_weight_but_no_update():
    rows, _ = fednova_row_weights(np.array([2.0, 1.0]), np.array([0, 5]))
    assert list(rows) == [0.0, 0.2]
