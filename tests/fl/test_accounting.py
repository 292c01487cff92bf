"""The accountant wrapper against direct dp_accounting computations and against closed forms."""
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy import optimize, stats

from fedmpi.fl.accounting import MAX_NOISE_MULTIPLIER, Accountant, default_delta, effective_noise_multiplier
from fedmpi.fl.sampling import sample_count

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE
Gaussian = dp_accounting.GaussianDpEvent


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Tight epsilon of a Gaussian mechanism with sensitivity/stddev mu (Balle and Wang 2018, Thm. 8)."""
    def gap(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta
    return optimize.brentq(gap, 0.0, 500.0, xtol=1e-12)


def classic_rdp_epsilon(rdp_of_order, delta: float) -> float:
    """min over the library's orders of rdp(a) + log(1/delta) / (a - 1) (Mironov 2017, Prop. 3): a looser bound."""
    orders = np.array(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    return float(np.min(rdp_of_order(orders) + math.log(1 / delta) / (orders - 1)))


@pytest.mark.parametrize("q,z,rounds,delta", [(0.1, 1.0, 100, 1e-5), (0.01, 0.8, 1000, 1e-6), (0.5, 3.0, 10, 1e-3)])
def test_poisson_epsilon_equals_a_direct_dp_accounting_computation_rdp_and_pld(q, z, rounds, delta):
    event = dp_accounting.PoissonSampledDpEvent(q, Gaussian(z))
    direct_rdp = rdp.RdpAccountant(neighboring_relation=ADD_REMOVE).compose(event, rounds).get_epsilon(delta)
    direct_pld = pld.PLDAccountant(neighboring_relation=ADD_REMOVE).compose(event, rounds).get_epsilon(delta)
    assert math.isclose(Accountant(1000, q, "poisson", "rdp").epsilon(z, rounds, delta), direct_rdp, rel_tol=1e-12)
    assert math.isclose(Accountant(1000, q, "poisson", "pld").epsilon(z, rounds, delta), direct_pld, rel_tol=1e-9)
    assert direct_pld <= direct_rdp * 1.01  # PLD is the tighter of the two


@pytest.mark.parametrize("nodes,fraction,z,rounds", [(1000, 0.1, 2.0, 100), (60, 0.25, 4.0, 30)])
def test_fixed_sampling_is_m_of_n_without_replacement_with_half_the_multiplier_under_replace_one(nodes, fraction, z,
                                                                                                rounds):
    m = sample_count(nodes, fraction)
    event = dp_accounting.SampledWithoutReplacementDpEvent(nodes, m, Gaussian(z / 2))
    direct = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE).compose(event, rounds).get_epsilon(1e-5)
    assert math.isclose(Accountant(nodes, fraction, "fixed", "rdp").epsilon(z, rounds, 1e-5), direct, rel_tol=1e-12)


@pytest.mark.parametrize("z,rounds", [(1.0, 1), (2.0, 50), (5.0, 200)])
def test_without_sampling_pld_matches_the_analytic_gaussian_and_rdp_sits_between_it_and_the_classic_bound(z, rounds):
    """q = 1: T Gaussian releases of sensitivity 1 are one with mu = sqrt(T) / z, whose tight epsilon is closed form."""
    delta = 1e-5
    tight = analytic_gaussian_epsilon(math.sqrt(rounds) / z, delta)
    got_pld = Accountant(10, 1.0, "poisson", "pld").epsilon(z, rounds, delta)
    got_rdp = Accountant(10, 1.0, "poisson", "rdp").epsilon(z, rounds, delta)
    assert tight <= got_pld <= tight * 1.01 + 1e-3
    assert tight <= got_rdp <= classic_rdp_epsilon(lambda a: rounds * a / (2 * z ** 2), delta) + 1e-9


def test_fixed_sampling_of_every_node_is_a_gaussian_with_sensitivity_two_clips():
    """m = N: replace-one moves the sum by 2S, so epsilon is at least the tight one for mu = 2 sqrt(T) / z.

    Accounting with z itself (forgetting the factor 2) would fall below this lower bound.
    """
    z, rounds, delta = 4.0, 20, 1e-5
    got = Accountant(50, 1.0, "fixed", "rdp").epsilon(z, rounds, delta)
    assert got >= analytic_gaussian_epsilon(2 * math.sqrt(rounds) / z, delta)
    assert got <= classic_rdp_epsilon(lambda a: rounds * a * 4 / (2 * z ** 2), delta) + 1e-9


def test_effective_multiplier_combines_the_update_noise_and_the_count_noise():
    assert math.isclose(effective_noise_multiplier(1.0, 2.0), (1 + 1 / 16) ** -0.5)
    assert effective_noise_multiplier(1.3, 0.0) == 1.3 and effective_noise_multiplier(0.0, 5.0) == 0.0
    # it inverts TFF's adaptive_clip_noise_params: value z = (z_total^-2 - (2 sigma_b)^-2)^(-1/2)
    total, sigma_b = 1.1, 5.0
    value = (total ** -2 - (2 * sigma_b) ** -2) ** -0.5
    assert math.isclose(effective_noise_multiplier(value, sigma_b), total)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_adaptive_clipping_epsilon_equals_dp_accountings_own_composition_of_the_two_gaussians(sampling):
    """dp_accounting's RDP reduces a ComposedDpEvent of Gaussians itself: an independent check of the formula."""
    z, sigma_b, rounds = 1.2, 3.0, 200
    if sampling == "poisson":  # add/remove: the centred count has sensitivity 1/2, so its multiplier is 2 sigma_b
        inner = dp_accounting.ComposedDpEvent([Gaussian(z), Gaussian(2 * sigma_b)])
        event, relation = dp_accounting.PoissonSampledDpEvent(0.1, inner), ADD_REMOVE
    else:  # replace-one: sensitivity 2S for the sum and 1 for the count
        inner = dp_accounting.ComposedDpEvent([Gaussian(z / 2), Gaussian(sigma_b)])
        event, relation = dp_accounting.SampledWithoutReplacementDpEvent(1000, 100, inner), REPLACE_ONE
    direct = rdp.RdpAccountant(neighboring_relation=relation).compose(event, rounds).get_epsilon(1e-5)
    adaptive = Accountant(1000, 0.1, sampling, "rdp", count_stddev=sigma_b)
    assert math.isclose(adaptive.epsilon(z, rounds, 1e-5), direct, rel_tol=1e-9)
    assert adaptive.epsilon(z, rounds, 1e-5) > Accountant(1000, 0.1, sampling, "rdp").epsilon(z, rounds, 1e-5)


def test_epsilon_grows_with_rounds_and_sampling_rate_and_falls_with_noise_and_delta():
    acc = Accountant(1000, 0.1)
    by_rounds = [acc.epsilon(1.0, t, 1e-5) for t in (1, 10, 100, 1000)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_noise = [acc.epsilon(z, 100, 1e-5) for z in (0.7, 1.0, 2.0, 5.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    by_q = [Accountant(1000, q).epsilon(1.0, 100, 1e-5) for q in (0.01, 0.1, 0.5, 1.0)]
    assert by_q == sorted(by_q) and len(set(by_q)) == 4
    assert acc.epsilon(1.0, 100, 1e-3) < acc.epsilon(1.0, 100, 1e-7)
    assert acc.epsilon(1.0, 0, 1e-5) == 0.0 and acc.epsilon(0.0, 5, 1e-5) == math.inf


@pytest.mark.parametrize("sampling,method,count_stddev,target,rounds,tol", [
    ("poisson", "rdp", 0.0, 2.0, 100, 1e-3), ("poisson", "rdp", 5.0, 8.0, 500, 1e-3),
    ("fixed", "rdp", 0.0, 4.0, 50, 1e-3), ("poisson", "pld", 0.0, 3.0, 40, 1e-2)])
def test_the_solved_noise_multiplier_reaches_the_target_and_no_less_noise_would(sampling, method, count_stddev, target,
                                                                               rounds, tol):
    acc = Accountant(1000, 0.1, sampling, method, count_stddev)
    z = acc.solve_noise_multiplier(target, rounds, 1e-5, rel_tol=tol)
    assert acc.epsilon(z, rounds, 1e-5) <= target < acc.epsilon(z / (1 + tol), rounds, 1e-5)


def test_an_unreachable_target_is_a_clear_error_naming_what_to_change():
    with pytest.raises(ValueError, match=r"dp_target_epsilon 0.5 cannot be reached in 1000 rounds.*count_stddev"):
        Accountant(1000, 0.1, count_stddev=0.5).solve_noise_multiplier(0.5, 1000, 1e-5)
    with pytest.raises(ValueError, match=r"even dp_noise_multiplier 1000"):
        Accountant(10, 1.0).solve_noise_multiplier(1e-4, 10_000, 1e-5)
    assert Accountant(10, 1.0).epsilon(MAX_NOISE_MULTIPLIER, 10_000, 1e-5) > 1e-4
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="dp_target_epsilon"):
            Accountant(1000, 0.1).solve_noise_multiplier(bad, 10, 1e-5)


def test_pld_with_fixed_sampling_is_refused_because_dp_accounting_cannot_account_it():
    event = dp_accounting.SampledWithoutReplacementDpEvent(1000, 100, Gaussian(1.0))
    assert not pld.PLDAccountant(neighboring_relation=REPLACE_ONE).supports(event)
    assert not pld.PLDAccountant(neighboring_relation=ADD_REMOVE).supports(event)
    with pytest.raises(ValueError, match="dp_accountant pld cannot account sampling fixed"):
        Accountant(1000, 0.1, "fixed", "pld")


@pytest.mark.parametrize("kwargs,match", [
    (dict(nodes=0, fraction=0.1), "nodes"), (dict(nodes=10, fraction=0.0), "fraction"),
    (dict(nodes=10, fraction=1.5), "fraction"), (dict(nodes=10, fraction=0.1, sampling="uniform"), "sampling"),
    (dict(nodes=10, fraction=0.1, method="prv"), "dp_accountant"),
    (dict(nodes=10, fraction=0.1, count_stddev=-1.0), "dp_clip_count_stddev")])
def test_bad_settings_are_refused_naming_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Accountant(**kwargs)


def test_delta_defaults_to_one_over_n_to_the_1_1_and_bad_deltas_are_refused():
    assert math.isclose(default_delta(1000), 1000 ** -1.1) and default_delta(1000) < 1 / 1000
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="dp_delta"):
            Accountant(1000, 0.1).epsilon(1.0, 10, bad)


def test_the_fixed_denominator_is_qn_for_poisson_and_m_for_fixed():
    assert Accountant(1000, 0.1).expected_nodes == 100.0
    assert Accountant(7, 2.5 / 7, "fixed").expected_nodes == 3.0  # sampling's m rounds halves up
