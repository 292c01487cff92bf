import torch

from fedmpi.engine.models import build_model, count_params


def test_2nn_is_the_tutorials_784_200_200_10_mlp():
    model = build_model("2nn", (1, 28, 28), 10, seed=0)
    assert count_params(model) == 199_210
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_has_mcmahans_parameter_count():
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    assert count_params(model) == 1_663_370
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_initial_weights_depend_on_the_seed_only_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("2nn", (1, 28, 28), 10, seed=5)
    after = torch.rand(1)
    b, c = build_model("2nn", (1, 28, 28), 10, seed=5), build_model("2nn", (1, 28, 28), 10, seed=6)
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
