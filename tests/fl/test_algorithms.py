"""SCAFFOLD's update rules on hand-computed arrays."""
import torch

from fedmpi.fl.algorithms import scaffold_correction, scaffold_node_controls, scaffold_server_control


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
