"""Corruption processes: closed-form identities of EqM and flow matching, argument checks, YAML instantiation."""

import pytest
import torch

from dcssdae.corruption import EquilibriumMatching, FlowMatching

DECAYS = ["linear", "truncated", "piecewise"]
PROCESSES = [EquilibriumMatching(d) for d in DECAYS] + [EquilibriumMatching("piecewise", multiplier=1.5, a=0.6),
                                                          FlowMatching()]


def _batch(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 8, 8, generator=g) * 2 - 1, torch.randn(b, 3, 8, 8, generator=g)


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_to_x0_inverts_corrupt_when_pred_is_target(process):
    x, noise = _batch()
    # random levels plus both ends: gamma = 1 / t = 0 is data, gamma = 0 / t = 1 is pure noise
    level = torch.cat([process.sample_level(x[:3], torch.Generator().manual_seed(1)), torch.tensor([0.0, 1.0])])
    x_t = process.corrupt(x, noise, level)
    x0_hat = process.to_x0(x_t, process.target(x, noise, level), level)
    assert torch.isfinite(x0_hat).all()
    torch.testing.assert_close(x0_hat, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_corrupt_endpoints_and_shapes(process):
    x, noise = _batch()
    ones, zeros = torch.ones(5), torch.zeros(5)
    data_level, noise_level = (ones, zeros) if isinstance(process, EquilibriumMatching) else (zeros, ones)
    torch.testing.assert_close(process.corrupt(x, noise, data_level), x)
    torch.testing.assert_close(process.corrupt(x, noise, noise_level), noise)
    level = process.sample_level(x)
    assert level.shape == (5,) and level.dtype == torch.float32
    assert process.target(x, noise, level).shape == x.shape
    assert process.loss(process.target(x, noise, level), process.target(x, noise, level)).shape == (5,)
    with pytest.raises(ValueError, match="one value per sample"):
        process.corrupt(x, noise, torch.rand(4))


def test_eqm_target_is_noise_minus_data_times_c():
    x, noise = _batch()
    eqm = EquilibriumMatching("linear", multiplier=3.0)
    gamma = torch.linspace(0, 0.9, 5)
    expected = (noise - x) * (3.0 * (1 - gamma)).view(-1, 1, 1, 1)
    torch.testing.assert_close(eqm.target(x, noise, gamma), expected)
    # descent direction: x_gamma - eta * f* moves towards the data
    x_t = eqm.corrupt(x, noise, gamma)
    stepped = x_t - 0.1 * eqm.target(x, noise, gamma)
    assert ((stepped - x).flatten(1).norm(dim=1) < (x_t - x).flatten(1).norm(dim=1)).all()


@pytest.mark.parametrize("decay", DECAYS)
def test_eqm_decay_values(decay):
    eqm = EquilibriumMatching(decay, multiplier=2.0, a=0.8, b=1.4)
    gamma = torch.linspace(0, 1, 101)
    c = eqm.c(gamma)
    assert c[-1] == 0 and (c[:-1] > 0).all()
    expected_c0 = {"linear": 2.0, "truncated": 2.0, "piecewise": 2.8}[decay]
    assert c[0].item() == pytest.approx(expected_c0)
    if decay != "linear":  # continuous at a, linear fall to 0 above it
        assert eqm.c(0.8 - 1e-6).item() == pytest.approx(eqm.c(0.8 + 1e-6).item(), abs=1e-4)
        assert eqm.c(0.9).item() == pytest.approx(2.0 * 0.1 / 0.2)
    assert (c[1:] <= c[:-1] + 1e-6).all()  # non-increasing for these parameters
    # the closed-form step equals (1 - gamma) / c(gamma) wherever c > 0, and stays finite at gamma = 1
    step = eqm.step_to_data(gamma)
    torch.testing.assert_close(step[:-1], ((1 - gamma) / c)[:-1])
    assert torch.isfinite(step).all()


def test_eqm_default_multiplier_per_decay():
    assert EquilibriumMatching().multiplier == 2.0
    assert EquilibriumMatching("truncated").multiplier == 4.0  # EqM paper
    assert EquilibriumMatching("truncated", multiplier=1.0).multiplier == 1.0
    assert EquilibriumMatching().step_to_data(0.0).item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decay": "cosine"}, "unknown EqM decay 'cosine'; known: linear, truncated, piecewise"),
        ({"multiplier": 0.0}, "multiplier lambda must be > 0"),
        ({"multiplier": -1.0}, "multiplier lambda must be > 0"),
        ({"a": 1.0}, r"a must lie in \(0, 1\)"),
        ({"a": 0.0}, r"a must lie in \(0, 1\)"),
        ({"b": 0.0}, "b must be > 0"),
    ],
)
def test_eqm_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EquilibriumMatching(**kwargs)


def test_flow_matching_level_and_time():
    fm = FlowMatching(logit_mean=1.0, logit_std=0.5)
    x = torch.zeros(20000, 1)
    t = fm.sample_level(x, torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    assert torch.logit(t).mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.logit(t).std().item() == pytest.approx(0.5, abs=0.02)
    assert fm.time_conditioned and fm.decoder_time(t) is t
    with pytest.raises(ValueError, match="logit_std must be > 0"):
        FlowMatching(logit_std=0.0)


def test_eqm_level_is_uniform_and_time_free():
    eqm = EquilibriumMatching()
    x = torch.zeros(20000, 1)
    gamma = eqm.sample_level(x, torch.Generator().manual_seed(0))
    assert ((gamma >= 0) & (gamma < 1)).all()
    assert gamma.mean().item() == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(gamma, eqm.sample_level(x, torch.Generator().manual_seed(0)))
    assert not eqm.time_conditioned and eqm.decoder_time(gamma) is None


def test_loss_is_per_sample_mse():
    x, noise = _batch()
    eqm = EquilibriumMatching()
    loss = eqm.loss(x, noise)
    torch.testing.assert_close(loss, (x - noise).square().mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="prediction shape"):
        eqm.loss(x, noise[:, :2])


def test_instantiable_from_yaml_class_path():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--corruption", type=EquilibriumMatching | FlowMatching)
    config = parser.parse_string(
        "corruption:\n  class_path: dcssdae.corruption.EquilibriumMatching\n"
        "  init_args:\n    decay: truncated\n    a: 0.7\n"
    )
    corruption = parser.instantiate_classes(config).corruption
    assert isinstance(corruption, EquilibriumMatching)
    assert (corruption.decay, corruption.a, corruption.multiplier) == ("truncated", 0.7, 4.0)
    config = parser.parse_string("corruption:\n  class_path: dcssdae.corruption.FlowMatching\n")
    assert isinstance(parser.instantiate_classes(config).corruption, FlowMatching)
