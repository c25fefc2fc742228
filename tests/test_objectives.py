"""Corruption processes: closed-form identities of EqM and flow matching, argument checks, YAML instantiation."""

import pytest
import torch

from dcssdae.autoencoder import build_corruption, corruption_config
from dcssdae.objectives import EquilibriumMatching, FlowMatching

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
        ({"parameterization": "velocity"}, "unknown EqM parameterization 'velocity'; known: denoiser, field, gated"),
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


def test_eqm_noise_power_draws_levels_near_the_data_or_near_the_noise():
    """1 - gamma = u^p: P(1 - gamma < 0.1) = 0.1^(1/p), E[1 - gamma] = 1 / (p + 1); the power is kept in the config.
    p < 1 (the quick-start's 0.5) puts the levels near pure noise: P(1 - gamma > 0.5) = 1 - 0.5^(1/p)."""
    x = torch.zeros(40000, 1)
    for p, above_half in ((0.5, 0.75), (0.33, 1 - 0.5 ** (1 / 0.33))):
        gamma = EquilibriumMatching(noise_power=p).sample_level(x, torch.Generator().manual_seed(0))
        assert (1 - gamma > 0.5).float().mean().item() == pytest.approx(above_half, abs=0.01)
    for p in (0.33, 2.0, 3.0):
        eqm = EquilibriumMatching(noise_power=p)
        gamma = eqm.sample_level(x, torch.Generator().manual_seed(0))
        assert ((gamma > 0) & (gamma <= 1)).all()
        assert (1 - gamma < 0.1).float().mean().item() == pytest.approx(0.1 ** (1 / p), abs=0.01)
        assert (1 - gamma).mean().item() == pytest.approx(1 / (p + 1), abs=0.01)
        assert corruption_config(eqm)["init_args"]["noise_power"] == p
        assert build_corruption(corruption_config(eqm)).noise_power == p
    with pytest.raises(ValueError, match="noise_power must be > 0"):
        EquilibriumMatching(noise_power=0.0)


def test_eqm_uniform_fraction_mixes_the_paper_levels_back_in():
    """With probability f, gamma ~ U[0, 1) instead of 1 - u^p: P(1 - gamma < q) = f q + (1 - f) q^(1/p), which keeps
    levels near the data that p < 1 alone almost never draws. It only chooses training levels (`training_only`)."""
    x = torch.zeros(40000, 1)
    p, f = 0.4, 0.1
    eqm = EquilibriumMatching(noise_power=p, uniform_fraction=f)
    gamma = eqm.sample_level(x, torch.Generator().manual_seed(0))
    assert ((gamma >= 0) & (gamma <= 1)).all()
    for q in (0.2, 0.5):
        assert (1 - gamma < q).float().mean().item() == pytest.approx(f * q + (1 - f) * q ** (1 / p), abs=0.01)
    alone = EquilibriumMatching(noise_power=p).sample_level(x, torch.Generator().manual_seed(0))
    assert (1 - alone < 0.2).float().mean().item() < 0.5 * (1 - gamma < 0.2).float().mean().item()
    assert build_corruption(corruption_config(eqm)).uniform_fraction == f
    assert "uniform_fraction" in EquilibriumMatching.training_only
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="uniform_fraction must lie in"):
            EquilibriumMatching(noise_power=p, uniform_fraction=bad)


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
        "corruption:\n  class_path: dcssdae.objectives.EquilibriumMatching\n"
        "  init_args:\n    decay: truncated\n    a: 0.7\n"
    )
    corruption = parser.instantiate_classes(config).corruption
    assert isinstance(corruption, EquilibriumMatching)
    assert (corruption.decay, corruption.a, corruption.multiplier) == ("truncated", 0.7, 4.0)
    config = parser.parse_string("corruption:\n  class_path: dcssdae.objectives.FlowMatching\n")
    assert isinstance(parser.instantiate_classes(config).corruption, FlowMatching)


# ----------------------------------------------------------------------------------------------------------------
# The network output as the prediction: EqM's denoiser / field parameterisations, FM's velocity.


@pytest.mark.parametrize("multiplier", [2.0, 3.0])
def test_denoiser_form_under_the_linear_decay_predicts_the_image(multiplier):
    """f = lambda * (x_gamma - out): x0_hat is the output itself and the EqM loss is lambda^2 * MSE(out, x)."""
    x, noise = _batch()
    out = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    eqm = EquilibriumMatching("linear", multiplier=multiplier)
    assert eqm.parameterization == "denoiser"
    gamma = torch.tensor([0.0, 0.2, 0.5, 0.9, 0.999])
    x_t = eqm.corrupt(x, noise, gamma)
    pred = eqm.pred(x_t, out)
    torch.testing.assert_close(pred, multiplier * (x_t - out))
    torch.testing.assert_close(eqm.to_x0(x_t, pred, gamma), out, atol=1e-5, rtol=1e-5)
    loss = eqm.loss(pred, eqm.target(x, noise, gamma))
    torch.testing.assert_close(loss, multiplier**2 * (out - x).square().mean(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decay", DECAYS)
def test_denoiser_form_of_every_decay_uses_k_equal_c0(decay):
    """k = c(0) = 1 / step_to_data(0); at gamma = 0 x0_hat is the output for every decay."""
    x, noise = _batch()
    out = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    eqm = EquilibriumMatching(decay)
    c0 = eqm.c(0.0).item()
    torch.testing.assert_close(eqm.pred(noise, out), c0 * (noise - out))
    zero = torch.zeros(5)
    torch.testing.assert_close(eqm.to_x0(noise, eqm.pred(noise, out), zero), out, atol=1e-5, rtol=1e-5)


def test_gated_denoiser_blends_its_input_and_its_image_by_the_gate():
    """out = [D~, g]: D = s x_gamma + (1 - s) D~ with s = sigmoid(g + GATE_BIAS); a closed gate is the denoiser form,
    an open one passes x_gamma through (zero field); x0_hat = D under the linear decay and the loss is k^2 |D - x|^2."""
    from dcssdae.objectives import GATE_BIAS

    x, noise = _batch()
    image = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    eqm = EquilibriumMatching(parameterization="gated")
    assert eqm.extra_outputs == 1 and EquilibriumMatching().extra_outputs == 0
    gamma = torch.tensor([0.0, 0.2, 0.5, 0.9, 0.999])
    x_t = eqm.corrupt(x, noise, gamma)
    logit = torch.linspace(-3, 3, 5).view(5, 1, 1, 1).expand(5, 1, *x.shape[2:])
    pred = eqm.pred(x_t, torch.cat([image, logit], 1))
    s = torch.sigmoid(logit + GATE_BIAS)
    blend = s * x_t + (1 - s) * image
    torch.testing.assert_close(eqm.to_x0(x_t, pred, gamma), blend, atol=1e-5, rtol=1e-5)
    loss = eqm.loss(pred, eqm.target(x, noise, gamma))
    torch.testing.assert_close(loss, 4 * (blend - x).square().mean(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5)
    closed = eqm.pred(x_t, torch.cat([image, torch.full_like(logit, -1e4)], 1))
    torch.testing.assert_close(closed, EquilibriumMatching().pred(x_t, image))
    opened = eqm.pred(x_t, torch.cat([image, torch.full_like(logit, 1e4)], 1))
    torch.testing.assert_close(opened, torch.zeros_like(x_t))
    out = torch.cat([image, logit], 1)  # dtypes as the denoiser form's: a bf16 model keeps bf16, autocast float32
    assert eqm.pred(x_t.bfloat16(), out.bfloat16()).dtype == torch.bfloat16
    assert eqm.pred(x_t, out.bfloat16()).dtype == torch.float32


def test_gated_autoencoder_has_a_gate_channel_and_round_trips():
    """The decoder gets one more output channel for the gate; a fresh model decodes (almost) to grey in one step;
    the saved config rebuilds the same network."""
    from dcssdae.autoencoder import DCSSDAE
    from dcssdae.objectives import GATE_BIAS

    torch.manual_seed(0)
    corruption = {"class_path": "dcssdae.objectives.EquilibriumMatching", "init_args": {"parameterization": "gated"}}
    model = DCSSDAE("tiny-f8c4", "tiny", corruption=corruption).eval()
    assert model.decoder.out_conv.out_channels == 4 and model.decoder.image_channels == 3
    assert "extra_out_channels" not in model.config()["decoder_overrides"]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn_like(x)
    with torch.no_grad():
        x_hat = model.decode(model.encode(x), noise=noise, steps=1)
        torch.testing.assert_close(x_hat, torch.sigmoid(torch.tensor(GATE_BIAS)) * noise)
        rebuilt = DCSSDAE.from_config(model.config())
        rebuilt.load_state_dict(model.state_dict())
        torch.testing.assert_close(rebuilt.decode(rebuilt.encode(x), noise=noise, steps=1), x_hat)
    with pytest.raises(ValueError, match="drop it"):
        DCSSDAE("tiny-f8c4", "tiny", corruption=corruption, decoder_overrides={"extra_out_channels": 1})
    with pytest.raises(ValueError, match="needs 4 output channels"):
        EquilibriumMatching(parameterization="gated").pred(x, torch.zeros_like(x))


def test_field_form_and_flow_matching_pass_the_output_through():
    x, noise = _batch()
    assert EquilibriumMatching(parameterization="field").pred(x, noise) is noise
    assert FlowMatching().pred(x, noise) is noise


def test_zero_output_network_decodes_one_step_to_grey_not_noise():
    """A zero-initialised denoiser lands on 0 (grey) in one step from noise; the field form stays at the noise."""
    from dcssdae.sampling import sample

    _, noise = _batch()
    for parameterization, expected in (("denoiser", torch.zeros_like(noise)), ("field", noise)):
        eqm = EquilibriumMatching(parameterization=parameterization)
        fn = lambda x, eqm=eqm: eqm.pred(x, torch.zeros_like(x))
        x, _ = sample(fn, noise, "one_step", eta=eqm.step_to_data(0.0).item())
        torch.testing.assert_close(x, expected)


def test_saved_configs_without_parameterization_build_the_field_form_and_new_ones_round_trip():
    from dcssdae.autoencoder import build_corruption, corruption_config

    old = {"class_path": "dcssdae.corruption.EquilibriumMatching",  # the module's older name
           "init_args": {"decay": "linear", "multiplier": 2.0, "a": 0.8, "b": 1.4}}
    assert build_corruption(old).parameterization == "field"
    assert isinstance(build_corruption({"class_path": "dcssdae.corruption.FlowMatching"}), FlowMatching)
    with pytest.raises(ValueError, match="unknown corruption"):
        build_corruption({"class_path": "dcssdae.corruption.Nothing"})
    assert build_corruption({"class_path": "dcssdae.objectives.EquilibriumMatching"}).parameterization == "field"
    assert build_corruption(None).parameterization == "denoiser"
    for corruption in (EquilibriumMatching(), EquilibriumMatching("truncated", parameterization="field"),
                       FlowMatching(logit_mean=0.5)):
        config = corruption_config(corruption)
        rebuilt = build_corruption(config)
        assert repr(rebuilt) == repr(corruption) and corruption_config(rebuilt) == config


def test_fresh_autoencoder_decodes_to_grey_and_an_old_config_keeps_the_field_form():
    """The decoder's output layer starts at zero: a new (denoiser) model decodes to 0 in one step, not to noise;
    a config saved before `parameterization` existed rebuilds the field form, and a new one round-trips."""
    from dcssdae.autoencoder import DCSSDAE

    torch.manual_seed(0)
    model = DCSSDAE("tiny-f8c4", "tiny").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn_like(x)
    with torch.no_grad():
        x_hat = model.decode(model.encode(x), noise=noise, steps=1)
        torch.testing.assert_close(x_hat, torch.zeros_like(x))
        config = model.config()
        assert config["corruption"]["init_args"]["parameterization"] == "denoiser"
        assert DCSSDAE.from_config(config).corruption.parameterization == "denoiser"
        del config["corruption"]["init_args"]["parameterization"]
        old = DCSSDAE.from_config(config)
        old.load_state_dict(model.state_dict())
        assert old.corruption.parameterization == "field"
        torch.testing.assert_close(old.decode(old.encode(x), noise=noise, steps=1), noise)
