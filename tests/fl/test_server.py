"""Server optimizers against updates worked out by hand (the arithmetic is in the comments)."""
import pytest
import torch

from fedmpi.config import Config
from fedmpi.fl.server import FedAdam, FedAvgM, FedYogi, ServerOptimizer, from_config, make_server_optimizer


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(got, want, atol=1e-9):
    return torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                          rtol=0, atol=atol)


def run(opt, main, updates):
    """Every main model along the way, starting after the first step."""
    out = []
    for d in updates:
        main = opt.step(main, t(*d))
        out.append(main.tolist())
    return out


def test_none_is_plain_fedavg_scaled_by_the_server_lr():
    assert make_server_optimizer("none").step(t(1, 2), t(0.5, -1)).tolist() == [1.5, 1.0]
    # 0.5 * [0.5, -1] = [0.25, -0.5]
    assert ServerOptimizer(lr=0.5).step(t(1, 2), t(0.5, -1)).tolist() == [1.25, 1.5]


@pytest.mark.parametrize("name", ["none", "fedavgm", "fedadam"])
def test_a_scaled_sum_steps_exactly_like_the_mean_it_stands_for(name):
    """step(main, sum, 1/weight) == step(main, sum / weight): how combine.py hands over the Allreduce's sum."""
    summed, weight = t(1.0, -3.0, 0.5), 4.0
    direct = make_server_optimizer(name).step(t(1, 2, 3), summed / weight)
    scaled = make_server_optimizer(name).step(t(1, 2, 3), summed, 1 / weight)
    assert scaled.tolist() == direct.tolist() and scaled.tolist() != t(1, 2, 3).tolist()


def test_fedavgm_accumulates_momentum_across_rounds():
    # momentum 0.5, lr 2, main0 = [0, 0]
    # d1 = [1, -2]: v1 = [1, -2],                        main1 = 2 v1          = [2, -4]
    # d2 = [3,  0]: v2 = 0.5 [1, -2] + [3, 0] = [3.5, -1], main2 = [2, -4] + [7, -2] = [9, -6]
    # d3 = [0,  0]: v3 = [1.75, -0.5],                   main3 = [9, -6] + [3.5, -1] = [12.5, -7]
    opt = FedAvgM(lr=2.0, momentum=0.5)
    assert run(opt, t(0, 0), [[1, -2], [3, 0], [0, 0]]) == [[2, -4], [9, -6], [12.5, -7]]


ADAM_STEPS = [[2, -4], [2, 4], [0.5, 1]]


def test_fedadam_by_hand():
    # lr 1, b1 0.5, b2 0.75, tau 0 (so v0 = 0), main0 = [10, 10]
    # d1 = [2, -4]:  m = [1, -2];   v = 0.25 [4, 16] = [1, 4];              step [1/1, -2/2] = [1, -1] -> [11, 9]
    # d2 = [2, 4]:   m = [1.5, 1];  v = 0.75 [1, 4] + 0.25 [4, 16] = [1.75, 7]
    #                step [1.5/sqrt(1.75), 1/sqrt(7)] = [1.1338934190, 0.3779644730] -> [12.1338934190, 9.3779644730]
    # d3 = [.5, 1]:  m = [1, 1];    v = 0.75 [1.75, 7] + 0.25 [0.25, 1] = [1.375, 5.5]
    #                step [1/sqrt(1.375), 1/sqrt(5.5)] = [0.8528028654, 0.4264014327] -> [12.9866962845, 9.8043659057]
    got = run(FedAdam(lr=1.0, beta1=0.5, beta2=0.75, tau=0.0), t(10, 10), ADAM_STEPS)
    want = [[11, 9], [12.1338934190, 9.3779644730], [12.9866962845, 9.8043659057]]
    assert close(got, want)


def test_fedyogi_by_hand_grows_then_shrinks_v_additively():
    # Same settings. v0 = 0.
    # d1 = [2, -4]: v0 - d^2 < 0 so v = 0 + 0.25 [4, 16] = [1, 4]; m = [1, -2]; step [1, -1] -> [11, 9]
    # d2 = [2, 4]:  v1 - d^2 = [-3, -12] < 0 so v = [1, 4] + 0.25 [4, 16] = [2, 8]; m = [1.5, 1]
    #               step [1.5/sqrt(2), 1/sqrt(8)] = [1.0606601718, 0.3535533906] -> [12.0606601718, 9.3535533906]
    # d3 = [.5, 1]: v2 - d^2 = [1.75, 7] > 0 so v = [2, 8] - 0.25 [0.25, 1] = [1.9375, 7.75]; m = [1, 1]
    #               step [1/sqrt(1.9375), 1/sqrt(7.75)] = [0.7184212081, 0.3592106041] -> [12.7790813799, 9.7127639947]
    got = run(FedYogi(lr=1.0, beta1=0.5, beta2=0.75, tau=0.0), t(10, 10), ADAM_STEPS)
    want = [[11, 9], [12.0606601718, 9.3535533906], [12.7790813799, 9.7127639947]]
    assert close(got, want)


def test_tau_starts_v_at_tau_squared_and_sits_outside_the_square_root():
    # b1 0, b2 0.5, tau 0.5, lr 1, d = [1.5], main0 = [0]
    # Adam: v = 0.5 * 0.25 + 0.5 * 2.25 = 1.25;  step 1.5 / (sqrt(1.25) + 0.5) = 1.5 / 1.6180339887 = 0.9270509831
    # Yogi: v = 0.25 + 0.5 * 2.25 = 1.375;       step 1.5 / (sqrt(1.375) + 0.5) = 1.5 / 1.6726039399 = 0.8968052533
    adam = FedAdam(lr=1.0, beta1=0.0, beta2=0.5, tau=0.5).step(t(0), t(1.5))
    yogi = FedYogi(lr=1.0, beta1=0.0, beta2=0.5, tau=0.5).step(t(0), t(1.5))
    assert adam.item() == pytest.approx(0.9270509831, abs=1e-9)
    assert yogi.item() == pytest.approx(0.8968052533, abs=1e-9)


def test_server_lr_scales_the_adaptive_step():
    # The first FedAdam step above was [1, -1] at lr 1; at lr 0.01 it is [0.01, -0.01].
    step = FedAdam(lr=0.01, beta1=0.5, beta2=0.75, tau=0.0).step(t(10, 10), t(2, -4))
    assert step.tolist() == pytest.approx([10.01, 9.99], abs=1e-12)


@pytest.mark.parametrize("name", ["none", "fedavgm", "fedadam", "fedyogi"])
def test_state_round_trip_continues_exactly(name):
    first, updates = make_server_optimizer(name, 0.1), [t(1, -2, 3), t(-1, 0.5, 2), t(0.25, 1, -1)]
    main = t(0, 0, 0)
    for d in updates[:2]:
        main = first.step(main, d)
    second = make_server_optimizer(name, 0.1)
    second.load_state({k: v.float() for k, v in first.state().items()}, torch.device("cpu"))  # float32 back as float64
    assert set(second.state()) == {"none": set(), "fedavgm": {"momentum"}}.get(name, {"m", "v"})
    assert torch.allclose(second.step(main, updates[2]), first.step(main, updates[2]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_loaded_state_lives_on_the_given_device_and_the_next_step_runs_there(name):
    """A checkpoint's state is read on the CPU; resumed on a GPU it must follow the main model there.

    The meta device stands in for a GPU: mixing it with CPU tensors fails as cuda and cpu would.
    """
    first = make_server_optimizer(name, 0.1)
    first.step(t(0, 0, 0), t(1, -2, 3))
    second = make_server_optimizer(name, 0.1)
    second.load_state({k: v.float() for k, v in first.state().items()}, torch.device("meta"))
    assert {(v.device.type, v.dtype) for v in second.state().values()} == {("meta", torch.float64)}
    main = torch.zeros(3, device="meta")
    assert second.step(main, torch.ones(3, device="meta")).device.type == "meta"
    third = make_server_optimizer(name, 0.1)
    third.load_state(first.state(), torch.device("cpu"), dtype=torch.float32)
    assert {v.dtype for v in third.state().values()} == {torch.float32}


def test_main_keeps_its_dtype_and_shapes_must_match():
    main = torch.zeros(3, dtype=torch.float32)
    assert FedYogi().step(main, torch.ones(3)).dtype == torch.float32
    with pytest.raises(ValueError, match="main has shape .3,., update .2,."):
        FedAdam().step(main, torch.ones(2))


def test_config_picks_the_optimizer_and_its_settings():
    opt = from_config(Config(server_opt="fedyogi", server_beta1=0.8, server_tau=1e-2))
    assert isinstance(opt, FedYogi) and (opt.lr, opt.beta1, opt.beta2, opt.tau) == (0.01, 0.8, 0.99, 1e-2)
    assert type(from_config(Config())) is ServerOptimizer and from_config(Config()).lr == 1.0
    assert from_config(Config(server_opt="fedavgm", server_momentum=0.5)).momentum == 0.5
    with pytest.raises(ValueError, match="unknown server optimizer 'sgd'"):
        make_server_optimizer("sgd")
