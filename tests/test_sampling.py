"""Samplers against oracle fields whose answer is known in closed form, and on a 2-D mixture of Gaussians learnt by a
small MLP with the real EqM loss."""

import copy
import itertools
import math

import pytest
import torch

from dcssdae.objectives import EquilibriumMatching
from dcssdae.sampling import METHODS, ddim_gaussian_spread, low_pass, noise_grid, sample, time_grid

# ----------------------------------------------------------------------------------------------------------------
# Oracles.


def eqm_point_mass_field(eqm: EquilibriumMatching, x_star: torch.Tensor, n_gamma: int = 2000):
    """The ideal EqM field for data = the single point x_star (shape (d,)), by quadrature over gamma.

    y = gamma * x* + (1 - gamma) * noise gives noise - x* = (y - x*) / (1 - gamma), so
    f(y) = E[(noise - x*) c(gamma) | y] = (y - x*) * E[c(gamma) / (1 - gamma) | y], with the posterior
    p(gamma | y) proportional to N(y; gamma x*, (1 - gamma)^2 I) (uniform prior). For the linear decay the expectation
    is lambda whatever y is.
    """
    gamma = (torch.arange(n_gamma, dtype=torch.float64) + 0.5) / n_gamma
    ratio = eqm.c(gamma).double() / (1 - gamma)
    x_star = x_star.double()

    def field(y):
        y64 = y.double().flatten(1)
        d = y64.shape[1]
        sq = (y64[:, None, :] - gamma[None, :, None] * x_star).square().sum(-1)  # (B, G)
        log_post = -d * torch.log1p(-gamma) - sq / (2 * (1 - gamma) ** 2)
        scale = (torch.softmax(log_post, dim=1) * ratio).sum(1)  # (B,)
        return ((y64 - x_star) * scale[:, None]).view_as(y).to(y.dtype)

    return field


def linear_field(lam, x_star):
    """Exact ideal EqM field of a point mass under the linear decay: lambda * (x - x*)."""
    return lambda x: lam * (x - x_star)


def _rms(x):
    return x.flatten(1).square().mean(1).sqrt()


# ----------------------------------------------------------------------------------------------------------------
# Closed-form checks.


def test_linear_decay_oracle_is_exactly_lambda_times_displacement():
    eqm = EquilibriumMatching("linear", multiplier=3.0)
    x_star = torch.randn(6, generator=torch.Generator().manual_seed(0))
    y = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)) * 2
    torch.testing.assert_close(eqm_point_mass_field(eqm, x_star)(y), 3.0 * (y - x_star), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.1, 0.25, 0.4, 0.7])
def test_gd_error_follows_closed_form(eta):
    lam = 2.0
    x_star = torch.randn(3, 4, 4)
    noise = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for steps in (1, 3, 8):
        x, nfe = sample(linear_field(lam, x_star), noise, "gd", steps=steps, eta=eta, schedule="constant")
        torch.testing.assert_close(x - x_star, (1 - eta * lam) ** steps * (noise - x_star), rtol=1e-4, atol=1e-5)
        assert nfe.tolist() == [steps] * 5 and nfe.dtype == torch.long


def test_one_step_exact_with_step_to_data():
    eqm = EquilibriumMatching()
    x_star = torch.rand(3, 8, 8) * 2 - 1
    noise = torch.randn(4, 3, 8, 8)
    eta = eqm.step_to_data(0.0).item()
    x, nfe = sample(linear_field(eqm.multiplier, x_star), noise, "one_step", eta=eta)
    torch.testing.assert_close(x, x_star.expand_as(x), atol=1e-6, rtol=0)
    assert nfe.tolist() == [1] * 4
    # defaults match the default EquilibriumMatching
    torch.testing.assert_close(sample(linear_field(eqm.multiplier, x_star), noise, "one_step")[0], x)


@pytest.mark.parametrize("decay", ["truncated", "piecewise"])
def test_gd_converges_on_quadrature_oracle(decay):
    eqm = EquilibriumMatching(decay)  # lambda = 4; near the data f ~ lambda / (1 - a) * (x - x*) = 20 (x - x*)
    x_star = torch.rand(8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    field = eqm_point_mass_field(eqm, x_star)
    noise = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    errors = [_rms(sample(field, noise, "gd", steps=s, eta=0.04, schedule="constant")[0] - x_star).max().item()
              for s in (1, 4, 8, 12)]
    assert all(b < a for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-4 * errors[0]  # near the data each step contracts by 1 - 0.04 * 20 = 0.2


def test_nesterov_standard_accelerates_and_eqm_form_does_not():
    lam, eta, mu = 2.0, 0.1, 0.3  # a = eta * lambda = 0.2, mu < 1 - a
    x_star = torch.zeros(2, 4, 4)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    field = linear_field(lam, x_star)
    const = {"schedule": "constant"}
    gd = _rms(sample(field, noise, "gd", steps=12, eta=eta, **const)[0])
    standard = _rms(sample(field, noise, "nesterov", steps=12, eta=eta, mu=mu, **const)[0])
    eqm_form = _rms(sample(field, noise, "nesterov", steps=12, eta=eta, mu=mu, form="eqm", **const)[0])
    assert (standard < 0.5 * gd).all()
    assert (eqm_form > gd).all()
    # with the exact step a = 1: standard Nesterov stays exact, the EqM form is left with mu * e0 after two steps
    x, nfe = sample(field, noise, "nesterov", steps=2, eta=1 / lam, mu=mu, **const)
    torch.testing.assert_close(x, torch.zeros_like(x), atol=1e-6, rtol=0)
    x, _ = sample(field, noise, "nesterov", steps=2, eta=1 / lam, mu=mu, form="eqm", **const)
    torch.testing.assert_close(x, mu * noise, atol=1e-6, rtol=1e-5)
    assert nfe.tolist() == [2] * 3


def test_nesterov_mu_zero_is_gd():
    field = linear_field(2.0, torch.ones(5))
    noise = torch.randn(4, 5)
    for schedule, step in (("constant", {"eta": 0.3}), ("noise", {"step_to_data": 0.3})):
        torch.testing.assert_close(sample(field, noise, "nesterov", steps=5, mu=0.0, schedule=schedule, **step)[0],
                                   sample(field, noise, "gd", steps=5, schedule=schedule, **step)[0])


def test_adaptive_nfe_per_sample_matches_closed_form_and_shrinks_the_batch():
    """Constant steps on lambda * x with a step to the data s = 0.25 (half the true 1 / lambda): x_k = q^k x_0,
    q = 1 - eta * lam, and the estimate x0_hat_k = x_k - s f(x_k) = 0.5 q^k x_0 changes by c_k = 0.5 q^(k-1) (1 - q)
    |x_0|. Each step removes r = eta / s of the remaining noise, t_k = (1 - r)^k, u_k = 1 / t_k - 1; the stopping
    statistic is max(c_k (1 - r) / r, sqrt(c_k / (u_k - u_{k-1})))."""
    lam, eta, s, threshold = 2.0, 0.1, 0.25, 1e-3
    q, r = 1 - eta * lam, eta / s
    scales = torch.tensor([0.01, 0.1, 1.0, 10.0])
    noise = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    noise = noise / _rms(noise)[:, None] * scales[:, None]  # rms distance to x* = 0 is exactly `scales`
    seen = []

    def field(x):
        seen.append(x.shape[0])
        return lam * x

    x, nfe = sample(field, noise, "adaptive", eta=eta, threshold=threshold, max_steps=100, schedule="constant",
                    step_to_data=lambda gamma: torch.tensor(s))
    expected = []
    for scale in scales.tolist():
        k = 1
        while True:
            change = 0.5 * q ** (k - 1) * (1 - q) * scale
            du = (1 - r) ** -k - (1 - r) ** -(k - 1)
            if max(change * (1 - r) / r, math.sqrt(change / du)) < threshold:
                break
            k += 1
        expected.append(k + 1)  # evaluations 0..k
    assert nfe.tolist() == expected and len(set(expected)) == 4
    assert sum(seen) == nfe.sum().item()                      # only running samples are evaluated
    assert seen == sorted(seen, reverse=True) and seen[0] == 4
    # a stopped sample returns its estimate x0_hat_k = 0.5 q^k x_0
    torch.testing.assert_close(_rms(x), scales * 0.5 * q ** (nfe.float() - 1), rtol=1e-4, atol=0)


def test_adaptive_does_not_stop_at_the_posterior_mean_and_caps_steps():
    """A point mass is settled after two evaluations (x0_hat = x* both times) and returns x* exactly; with context
    indexing, per-sample targets; a threshold never met runs max_steps and ends on the grid's last estimate."""
    targets = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x, nfe = sample(lambda x, z: 2.0 * (x - z), noise, "adaptive", context=(targets,), threshold=1e-3, max_steps=7)
    assert nfe.tolist() == [2] * 5
    torch.testing.assert_close(x, targets)
    x, nfe = sample(lambda x, z: 2.0 * (x - z), noise, "adaptive", context=(targets,), step_to_data=0.3,
                    threshold=1e-12, max_steps=7)
    assert nfe.tolist() == [7] * 5
    torch.testing.assert_close(x, sample(lambda x, z: 2.0 * (x - z), noise, "gd", context=(targets,), step_to_data=0.3,
                                         steps=7)[0])


def test_euler_on_flow_matching_oracles():
    x_star = torch.randn(3, 4, 4)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    # point mass: v(x, t) = (x* - x) / t is exact on any grid
    for steps in (1, 2, 7):
        x, nfe = sample(lambda x, t: (x_star - x) / t.view(-1, 1, 1, 1), noise, "euler", steps=steps, shift=3.0)
        torch.testing.assert_close(x, x_star.expand_as(x), atol=1e-5, rtol=1e-5)
        assert nfe.tolist() == [steps] * 2
    # Gaussian data N(mu, s^2): the probability-flow ODE maps noise to mu + s * noise (it keeps each quantile);
    # Euler converges to it at first order
    mu, s = 0.5, 0.3

    def velocity(x, t):
        t = t.view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * s**2 + t**2
        centred = x - (1 - t) * mu
        return mu + ((1 - t) * s**2 - t) / var * centred  # E[x | x_t] - E[noise | x_t]

    errors = [(sample(velocity, noise, "euler", steps=n, shift=1.0)[0] - (mu + s * noise)).abs().max().item()
              for n in (8, 32, 128)]
    assert all(b < 0.35 * a for a, b in itertools.pairwise(errors)) and errors[-1] < 0.02  # first order: 4x steps, ~1/4


def test_time_grid_is_shifted():
    grid = time_grid(4, shift=2.0)
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.5625, 0.25, 0.0625, 0.0]))


def test_float_and_tensor_step_sizes():
    """Regression: the public DC-SSDAE sampler crashed on a float step size (`float.reshape`). Steps (eta, constant
    schedule) and steps to the data (step_to_data, noise schedule) may be numbers, 0-d tensors or one per sample."""
    field = linear_field(2.0, torch.zeros(3))
    noise = torch.randn(4, 3)
    for name, schedule in (("eta", "constant"), ("step_to_data", "noise")):
        reference = sample(field, noise, "gd", steps=3, schedule=schedule, **{name: 0.25})[0]
        for value in (0.25, torch.tensor(0.25), torch.full((4,), 0.25)):
            for method in ("gd", "nesterov"):
                x, _ = sample(field, noise, method, steps=3, schedule=schedule, **{name: value},
                              **({"mu": 0.0} if method == "nesterov" else {}))
                torch.testing.assert_close(x, reference)
    assert sample(field, noise, "gd", steps=1, eta=1, schedule="constant")[0].shape == noise.shape  # an int works too
    per_sample = torch.tensor([0.1, 0.2, 0.3, 0.4])
    x, _ = sample(field, noise, "adaptive", step_to_data=per_sample, threshold=1e-12, max_steps=3)
    for i in range(4):
        torch.testing.assert_close(x[i], sample(field, noise[i:i + 1], "gd", steps=3,
                                                step_to_data=per_sample[i].item())[0][0])


@pytest.mark.parametrize(
    "method, settings, error, message",
    [
        ("ddim", {}, ValueError, "unknown sampling method 'ddim'; known: gd, nesterov, adaptive, one_step, euler"),
        ("gd", {"step_size": 0.1}, ValueError, r"unknown setting\(s\) \['step_size'\] for sampling method 'gd'"),
        ("euler", {"eta": 0.1}, ValueError, "it takes: steps, shift"),
        ("gd", {"steps": 0}, ValueError, "steps must be an integer >= 1"),
        ("gd", {"steps": 2.5}, ValueError, "steps must be an integer >= 1"),
        ("gd", {"eta": -0.1, "schedule": "constant"}, ValueError, "eta must be > 0"),
        ("gd", {"eta": "0.1", "schedule": "constant"}, TypeError, "eta must be a number or a tensor"),
        ("gd", {"eta": torch.ones(3), "schedule": "constant"}, ValueError, "one value per sample"),
        ("gd", {"step_to_data": -0.5}, ValueError, "step_to_data must be > 0"),
        ("one_step", {"eta": 0.0}, ValueError, "eta must be > 0"),
        ("gd", {"eta": 0.1}, ValueError, r"eta is the step of schedule='constant' .* drop eta, or pass"),
        ("adaptive", {"eta": 0.1, "step_to_data": 0.5}, ValueError, "eta is the step of schedule='constant'"),
        ("nesterov", {"power": 2.0, "schedule": "constant"}, ValueError, r"power=2.0 shapes the noise grid"),
        ("nesterov", {"mu": 1.0}, ValueError, r"mu must lie in \[0, 1\)"),
        ("nesterov", {"form": "heavy_ball"}, ValueError, "unknown nesterov form"),
        ("adaptive", {"threshold": 0.0}, ValueError, "threshold must be > 0"),
        ("adaptive", {"max_steps": 0}, ValueError, "max_steps must be an integer >= 1"),
        ("gd", {"schedule": "cosine"}, ValueError, "unknown schedule 'cosine'; known: constant, noise"),
        ("nesterov", {"power": 0.0}, ValueError, "power must be > 0"),
        ("gd", {"t_min": 1.0}, ValueError, r"t_min must lie in \[0, 1\)"),
        ("adaptive", {"t_min": -0.1}, ValueError, r"t_min must lie in \[0, 1\)"),
        ("gd", {"t_min": 0.1, "schedule": "constant"}, ValueError, "t_min=0.1 needs schedule='noise'"),
        ("gd", {"anchor": 0.5}, ValueError, r"anchor must be 0 \(off\) or a number >= 1"),
        ("nesterov", {"anchor": True}, ValueError, "anchor must be 0"),
        ("adaptive", {"anchor": 2}, ValueError, r"anchor=2 needs images \(B, C, H, W\)"),
    ],
)
def test_bad_settings(method, settings, error, message):
    with pytest.raises(error, match=message):
        sample(lambda x, *rest: x, torch.randn(2, 3), method, **settings)


def test_fn_shape_and_context_checks():
    with pytest.raises(ValueError, match="fn must return a tensor shaped like its input"):
        sample(lambda x: x[:, :1], torch.randn(2, 3), "gd")
    with pytest.raises(ValueError, match=r"context\[0\] must be a tensor with batch size 2"):
        sample(lambda x, z: x, torch.randn(2, 3), "gd", context=(torch.randn(3, 3),))


# ----------------------------------------------------------------------------------------------------------------
# 2-D mixture of Gaussians learnt by a small MLP with the real EqM loss.

MODES = torch.tensor([[1.5, 0.0], [0.0, 1.5], [-1.5, 0.0], [0.0, -1.5]])
MODE_STD = 0.1


@pytest.fixture(scope="module")
def mog_field():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide MLP is faster on one thread
    eqm = EquilibriumMatching()
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
        torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2),
    )
    steps = 600
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        x = MODES[torch.randint(len(MODES), (512,))] + MODE_STD * torch.randn(512, 2)
        noise, gamma = torch.randn_like(x), eqm.sample_level(x)
        loss = eqm.loss(net(eqm.corrupt(x, noise, gamma)), eqm.target(x, noise, gamma)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    net.requires_grad_(False)
    yield net
    torch.set_num_threads(threads)


def _mode_error(x):
    return torch.cdist(x, MODES).min(dim=1).values


def test_mog_samples_land_on_the_modes(mog_field):
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    x, _ = sample(mog_field, noise, "gd", steps=48, schedule="constant")  # 2-D: descend to the field's minima
    error = _mode_error(x)
    assert (error < 0.3).float().mean() > 0.97  # modes are 2.1 apart, each with std 0.1
    counts = torch.bincount(torch.cdist(x, MODES).argmin(dim=1), minlength=4)
    assert (counts > 150).all(), counts  # every mode is reached, none dominates


def test_mog_adaptive_spends_fewer_nfe_at_equal_error(mog_field):
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(2))
    const = {"schedule": "constant", "eta": 0.125}
    x, nfe = sample(mog_field, noise, "adaptive", threshold=0.01, max_steps=64, step_to_data=lambda g: 0.5, **const)
    adaptive_error = _mode_error(x).mean().item()
    gd_steps = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    gd_error = [_mode_error(sample(mog_field, noise, "gd", steps=n, **const)[0]).mean().item() for n in gd_steps]
    equal = [n for n, e in zip(gd_steps, gd_error) if e <= adaptive_error]
    needed = equal[0] if equal else math.inf  # fewest fixed steps with an error at least as low
    assert nfe.float().mean().item() < 0.8 * needed, (nfe.float().mean(), adaptive_error, gd_error)
    assert len(set(nfe.tolist())) > 3  # samples stop at different times


@pytest.mark.parametrize("method", [m for m in METHODS if m != "euler"])
def test_same_noise_same_output(mog_field, method):
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    first, nfe_first = sample(mog_field, noise, method)
    second, nfe_second = sample(mog_field, noise.clone(), method)
    assert torch.equal(first, second) and torch.equal(nfe_first, nfe_second)
    assert torch.isfinite(first).all()


# ----------------------------------------------------------------------------------------------------------------
# Sampling, not collapsing: exact EqM fields of data with a known spread (float64).


def _levels(eqm: EquilibriumMatching, n_gamma: int):
    gamma = (torch.arange(n_gamma, dtype=torch.float64) + 0.5) / n_gamma
    return gamma, eqm.c(gamma).double() / (1 - gamma)  # f* = c / (1 - gamma) * (y - x) at level gamma


def gaussian_field(eqm: EquilibriumMatching, mu: torch.Tensor, sigma: float, n_gamma: int = 2000):
    """The exact EqM field of x ~ N(mu, sigma^2 I) (mu (d,)): f(y) = E[c/(1-gamma) (y - E[x | y, gamma]) | y],
    gamma ~ U[0, 1) a posteriori from N(y; gamma mu, v I), v = gamma^2 sigma^2 + (1 - gamma)^2, and
    E[x | y, gamma] = mu + a (y - gamma mu), a = gamma sigma^2 / v. Linear decay: lambda (y - E[x | y])."""
    gamma, ratio = _levels(eqm, n_gamma)
    d, mm = mu.numel(), mu @ mu
    v = gamma**2 * sigma**2 + (1 - gamma) ** 2
    a = gamma * sigma**2 / v

    def field(y):
        sq = (y * y).sum(1, keepdim=True) - 2 * gamma * (y @ mu)[:, None] + gamma**2 * mm   # |y - gamma mu|^2
        w = torch.softmax(-0.5 * d * torch.log(v) - sq / (2 * v), dim=1) * ratio             # (B, G)
        return ((w * (1 - a)).sum(1, keepdim=True) * y - (w * (1 - a * gamma)).sum(1, keepdim=True) * mu)

    return field


def mixture_field(eqm: EquilibriumMatching, modes: torch.Tensor, std: float, n_gamma: int = 400):
    """The exact EqM field of an equal-weight mixture of N(m, std^2 I) over `modes` (M, d)."""
    gamma, ratio = _levels(eqm, n_gamma)
    d = modes.shape[1]
    v = gamma**2 * std**2 + (1 - gamma) ** 2
    a = gamma * std**2 / v

    def field(y):
        diff = y[:, None, None, :] - gamma[:, None, None] * modes                           # (B, G, M, d)
        log_w = -0.5 * d * torch.log(v)[:, None] - diff.square().sum(-1) / (2 * v[:, None])
        w = torch.softmax(log_w.flatten(1), 1).view(log_w.shape) * ratio[:, None]            # (B, G, M)
        return (w[..., None] * (y[:, None, None, :] - modes - a[:, None, None] * diff)).sum((1, 2))

    return field


SIGMA = 0.3


@pytest.fixture(scope="module")
def gaussian():
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(2000, generator=g, dtype=torch.float64) - 0.5
    return mu, torch.randn(16, 2000, generator=g, dtype=torch.float64)


def _mean_error_and_spread(x, mu):
    e = x - mu
    return e.mean(0).square().mean().sqrt().item(), e.std().item()  # RMS of the per-dim sample mean; spread


@pytest.mark.parametrize("method, settings", [
    ("gd", {"steps": 16}), ("gd", {"steps": 8, "power": 3.0}), ("nesterov", {"steps": 16}),
    ("nesterov", {"steps": 16, "form": "eqm"}), ("adaptive", {"max_steps": 32}),
])
def test_noise_schedule_samples_a_gaussian_with_the_right_spread(gaussian, method, settings):
    """x ~ N(mu, 0.3^2 I), d = 2000, 16 samples: the sample mean is within its sampling error of mu (0.3 / 4) and
    the spread around mu is within 10% of 0.3."""
    mu, noise = gaussian
    field = gaussian_field(EquilibriumMatching(), mu, SIGMA)
    x, nfe = sample(field, noise, method, **settings)
    mean_error, spread = _mean_error_and_spread(x, mu)
    assert mean_error < 1.2 * SIGMA / 4 and abs(spread - SIGMA) < 0.1 * SIGMA, (mean_error, spread)
    assert nfe.dtype == torch.long and (nfe <= settings.get("steps", settings.get("max_steps"))).all()


def known_level_gaussian_field(mu: torch.Tensor, sigma: float, levels: torch.Tensor):
    """The ideal linear-decay field lambda (y - E[x | y, gamma]) of x ~ N(mu, sigma^2 I) when the level of the k-th
    evaluation is known, gamma = 1 - levels[k] (what the DDIM update assumes; in high dimensions the time-free field
    comes close to it). E[x | y, gamma] = mu + a (y - gamma mu), a = gamma sigma^2 / (gamma^2 sigma^2 + (1 - gamma)^2)."""
    calls = iter(levels.tolist())

    def field(y):
        gamma = 1 - next(calls)
        a = gamma * sigma**2 / (gamma**2 * sigma**2 + (1 - gamma) ** 2)
        return 2.0 * (y - (mu + a * (y - gamma * mu)))

    return field


def test_the_derived_ddim_spread_by_hand():
    """2 steps at power 1 (t = 1, 0.5, 0): the first step keeps half the noise (a = 0 at gamma = 0), the second lands
    on E[x | y] with a = 0.5 * 0.09 / (0.25 * 0.09 + 0.25): m = 0.5 * a."""
    assert ddim_gaussian_spread(0.3, 2, power=1.0) == pytest.approx(0.5 * 0.045 / 0.2725, rel=1e-12)
    assert ddim_gaussian_spread(0.3, 1) == 0.0  # one step from pure noise: the mean, no spread


@pytest.mark.parametrize("steps, power, t_min", [
    (16, 2.0, 0.0), (8, 1.0, 0.0), (4, 1.0, 0.0), (2, 1.0, 0.0), (2, 0.5, 0.0), (16, 2.0, 0.1), (16, 2.0, 0.3),
])
def test_gd_on_the_noise_schedule_keeps_the_derived_spread(gaussian, steps, power, t_min):
    """With the level of every evaluation known, gd on the noise schedule maps the noise of a Gaussian N(mu, 0.3^2 I)
    to exactly mu + m * noise, m = `ddim_gaussian_spread` (the README's spread by schedule): 16 steps at power 2
    keep 91% of 0.3, fewer or coarser steps less, and a floor t_min gives some up."""
    mu, noise = gaussian
    grid = noise_grid(steps, power, dtype=torch.float64, t_min=t_min)
    x, nfe = sample(known_level_gaussian_field(mu, SIGMA, grid[:-1]), noise, "gd", steps=steps, power=power,
                    t_min=t_min)
    m = ddim_gaussian_spread(SIGMA, steps, power, t_min)
    torch.testing.assert_close(x, mu + m * noise, rtol=1e-10, atol=1e-10)
    assert (nfe == steps).all()


def test_noise_floor_moves_the_grid_and_keeps_the_last_jump_to_the_data():
    """t_min = 0 is the plain grid; t_min > 0 lifts every evaluated level to t_min + (1 - t_min) (1 - k/N)^p and
    still ends at t_N = 0 (the last step lands on the one-step estimate)."""
    plain = noise_grid(8, 2.0, dtype=torch.float64)
    torch.testing.assert_close(noise_grid(8, 2.0, dtype=torch.float64, t_min=0.0), plain)
    floored = noise_grid(8, 2.0, dtype=torch.float64, t_min=0.1)
    torch.testing.assert_close(floored[:-1], 0.1 + 0.9 * plain[:-1])
    assert floored[0] == 1.0 and floored[-1] == 0.0 and floored[-2] == pytest.approx(0.1 + 0.9 / 64)


@pytest.mark.parametrize("method", ["gd", "nesterov", "adaptive"])
def test_noise_floor_keeps_most_of_the_spread(gaussian, method):
    """A floor of t_min = 0.1 under the default 16-step grid keeps the posterior spread within 10% on the exact
    (time-free) field of the Gaussian, and the mean right (the spread with known levels: the test above)."""
    mu, noise = gaussian
    field = gaussian_field(EquilibriumMatching(), mu, SIGMA)
    settings = {"max_steps": 16, "threshold": 1e-9} if method == "adaptive" else {"steps": 16}
    x, nfe = sample(field, noise, method, t_min=0.1, **settings)
    error, spread = _mean_error_and_spread(x, mu)
    assert spread == pytest.approx(SIGMA, rel=0.1) and error < 0.1
    assert (nfe <= 16).all() and (method == "adaptive" or (nfe == 16).all())


def test_one_step_and_constant_steps_collapse_to_the_posterior_mean(gaussian):
    """The bug the noise schedule fixes: one step of 1 / lambda returns E[x | noise] (no spread at all), and
    constant steps of 1 / lambda start there and barely move (0.13 after 8 steps, 0.21 after 32, of 0.3)."""
    mu, noise = gaussian
    field = gaussian_field(EquilibriumMatching(), mu, SIGMA)
    assert _mean_error_and_spread(sample(field, noise, "one_step")[0], mu)[1] < 0.01
    for steps in (8, 32):
        spread = _mean_error_and_spread(sample(field, noise, "gd", steps=steps, schedule="constant")[0], mu)[1]
        assert spread < 0.8 * SIGMA, (steps, spread)


@pytest.mark.parametrize("decay", ["truncated", "piecewise"])
def test_noise_schedule_with_step_to_data_samples_other_decays(gaussian, decay):
    """Truncated / piecewise decays: the schedule needs s(gamma) = (1 - gamma) / c(gamma); with it gd samples the
    right spread, with the constant 1 / c(0) in its place (no `step_to_data`) it does not."""
    mu, noise = gaussian
    eqm = EquilibriumMatching(decay)
    field = gaussian_field(eqm, mu, SIGMA)
    for method in ("gd", "nesterov", "adaptive"):
        steps = {"max_steps": 32} if method == "adaptive" else {"steps": 16}
        x, _ = sample(field, noise, method, step_to_data=eqm.step_to_data, **steps)
        mean_error, spread = _mean_error_and_spread(x, mu)
        assert mean_error < 1.2 * SIGMA / 4 and abs(spread - SIGMA) < 0.1 * SIGMA, (method, mean_error, spread)
    # a point mass reaches the data exactly at the end of the grid (t_N = 0 ends on x0_hat)
    point = gaussian_field(eqm, mu, 1e-4)
    x, _ = sample(point, noise, "gd", steps=8, step_to_data=eqm.step_to_data)
    assert _rms(x - mu).max() < 1e-3


def test_noise_schedule_lands_on_the_modes_of_a_tight_mixture():
    """4 modes (std 0.05) in d = 16: with the noise schedule > 90% of samples lie within 4 std (per dimension) of a
    mode and every mode gets its share; one step lands between them (on the posterior mean). In 2-D the level
    posterior of a time-free field is broad, its minima sit inside the modes, and no schedule lands within 4 std."""
    g = torch.Generator().manual_seed(0)
    modes = torch.rand(4, 16, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(120, 16, generator=g, dtype=torch.float64)
    field = mixture_field(EquilibriumMatching(), modes, 0.05, n_gamma=200)

    def on_modes(x):
        distance = torch.cdist(x, modes).min(dim=1).values / 16**0.5  # RMS per dimension
        return (distance < 4 * 0.05).double().mean().item(), torch.bincount(torch.cdist(x, modes).argmin(1), minlength=4)

    for method, settings in (("gd", {"steps": 16}), ("nesterov", {"steps": 16}), ("adaptive", {"max_steps": 32})):
        fraction, counts = on_modes(sample(field, noise, method, **settings)[0])
        assert fraction > 0.9 and (counts > 15).all(), (method, fraction, counts)
    assert on_modes(sample(field, noise, "one_step")[0])[0] < 0.1


@pytest.mark.parametrize("method, settings", [
    ("gd", {"steps": 8}), ("gd", {"steps": 8, "t_min": 0.2}), ("nesterov", {"steps": 8}),
    ("nesterov", {"steps": 8, "form": "eqm"}), ("adaptive", {"max_steps": 8}), ("one_step", {}),
])
def test_every_sampler_ends_on_a_clean_estimate(gaussian, method, settings):
    """No noise left in the output: on the exact field of N(mu, 0.3^2 I) every method returns the one-step estimate
    y - f(y) / lambda = E[x | y] at the last point y it evaluated (per sample: adaptive stops samples at different
    steps), and on the field of a point mass it returns the point itself."""
    mu, noise = gaussian
    exact = gaussian_field(EquilibriumMatching(), mu, SIGMA)
    last = {}

    def field(y, index):
        f = exact(y)
        last.update({i: (y_i, f_i) for i, y_i, f_i in zip(index.tolist(), y, f)})
        return f

    x, _ = sample(field, noise, method, context=(torch.arange(len(noise)),), **settings)
    for i, (y, f) in last.items():
        torch.testing.assert_close(x[i], y - 0.5 * f, rtol=1e-9, atol=1e-9)
    point = gaussian_field(EquilibriumMatching(), mu, 1e-6)
    assert _rms(sample(point, noise, method, **settings)[0] - mu).max() < 1e-4


def image_gaussian(std: float, length: float, shape=(3, 8, 8), correlation: float = 0.9):
    """An image-like Gaussian N(mu, Sigma) over (C, H, W): exp(-distance / length) between pixels, colour channels
    correlated, per-pixel std `std` (as the detail p(x | z) leaves to draw: small and spatially correlated), around a
    smooth mean image; with Sigma's eigen-decomposition."""
    c, h, w = shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pixels = torch.stack([ys.flatten(), xs.flatten()], 1).double()
    spatial = torch.exp(-torch.cdist(pixels, pixels) / length)
    channels = torch.full((c, c), correlation, dtype=torch.float64).fill_diagonal_(1.0)
    sigma = std**2 * torch.kron(channels, spatial)
    g = torch.Generator().manual_seed(0)
    smooth = 0.16 * torch.kron(channels, torch.exp(-torch.cdist(pixels, pixels) / 4))
    mu = torch.linalg.cholesky(smooth + 1e-9 * torch.eye(len(smooth))) @ torch.randn(len(smooth), generator=g,
                                                                                       dtype=torch.float64)
    lam, basis = torch.linalg.eigh(sigma)
    return mu, lam.clamp(min=0), basis


def correlated_gaussian_field(eqm: EquilibriumMatching, mu, lam, basis, n_gamma: int = 200):
    """The exact EqM field of N(mu, U diag(lam) U^T): in the eigenbasis each coordinate is a 1-D Gaussian, so
    E[x | y, gamma] = mu + a (y - gamma mu) with a = gamma lam / v, v = gamma^2 lam + (1 - gamma)^2, per coordinate,
    and gamma a posteriori from N(y; gamma mu, U diag(v) U^T) (as `gaussian_field`, which is the case lam = sigma^2)."""
    gamma, ratio = _levels(eqm, n_gamma)
    v = gamma[:, None] ** 2 * lam + (1 - gamma[:, None]) ** 2              # (G, d)
    a = gamma[:, None] * lam / v
    mu_e = basis.T @ mu

    def field(y):
        r = (y @ basis)[:, None, :] - gamma[None, :, None] * mu_e           # (B, G, d)
        log_w = -0.5 * torch.log(v).sum(1) - 0.5 * (r.square() / v).sum(-1)
        w = torch.softmax(log_w, dim=1) * ratio                             # (B, G)
        return (w[..., None] * ((1 - a) * r - (1 - gamma[None, :, None]) * mu_e)).sum(1) @ basis.T

    return field


def test_adaptive_does_not_stop_at_the_mean_of_image_like_data():
    """On correlated data of small per-pixel spread (0.03) the estimate barely moves at high noise: stopping when it
    would move less than the threshold at the rate of the last step fired at the first check, on the posterior mean
    (spread 0.0004). Adaptive must keep sampling: the spread that gd keeps at the same step cap, within 10%."""
    mu, lam, basis = image_gaussian(0.03, 2.0)
    field = correlated_gaussian_field(EquilibriumMatching(), mu, lam, basis)
    noise = torch.randn(16, len(mu), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, nfe = sample(field, noise, "adaptive", max_steps=32)
    reference = sample(field, noise, "gd", steps=32)[0]
    spread, gd_spread = (x - mu).std().item(), (reference - mu).std().item()
    assert nfe.min() > 2 and spread == pytest.approx(gd_spread, rel=0.1), (nfe.tolist(), spread, gd_spread)
    assert gd_spread == pytest.approx(0.03, rel=0.15)


def test_autoencoder_default_sampler_samples_and_overrides_keep_the_schedule(monkeypatch):
    """DCSSDAE's EqM default is gd on the noise schedule; steps= keeps it (a grid for the new N); decode passes the
    corruption's step_to_data, which never enters the saved config; steps=1 alone is the one-step decoder."""
    from dcssdae import autoencoder
    from dcssdae.autoencoder import DCSSDAE

    model = DCSSDAE("tiny-f8c4", "tiny", corruption=EquilibriumMatching("truncated")).eval()
    assert model.sampler == {"method": "gd", "steps": 16, "schedule": "noise", "power": 2.0}
    assert model.sampler_settings(steps=4) == {**model.sampler, "steps": 4}
    assert model.sampler_settings(steps=1)["method"] == "one_step"
    assert model.sampler_settings(steps=5, method="adaptive")["max_steps"] == 5
    calls = []
    monkeypatch.setattr(autoencoder, "sample", lambda fn, noise, method, **kw: calls.append(kw) or (noise, None))
    model.decode(torch.zeros(1, 4, 4, 4), steps=3)
    assert calls[0]["step_to_data"] == model.corruption.step_to_data and calls[0]["steps"] == 3
    assert "step_to_data" not in model.config()["sampler"]
    with pytest.raises(ValueError, match="unknown setting"):
        DCSSDAE("tiny-f8c4", "tiny", sampler={"method": "gd", "step_to_data": None})


def test_eta_is_the_descent_step_or_refused():
    """`gd` with eta and steps is the EqM paper's descent x <- x - eta f(x) when the schedule is constant (closed form
    on lambda (x - x*)); under the default noise schedule, whose steps follow from the grid, eta is refused rather
    than read as something else or ignored."""
    x_star = torch.rand(3, 4, 4) * 2 - 1
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    field = linear_field(2.0, x_star)
    with pytest.raises(ValueError, match=r"eta is the step of schedule='constant'.*pass schedule='constant'"):
        sample(field, noise, "gd", eta=0.1, steps=40)
    x, _ = sample(field, noise, "gd", eta=0.1, steps=40, schedule="constant")
    torch.testing.assert_close(x - x_star, 0.8**40 * (noise - x_star), rtol=1e-4, atol=1e-6)


def test_saved_configs_keep_the_sampler_they_were_validated_with():
    """Every sampler config now names its schedule; one saved before schedules existed decodes with its constant
    step, as it was validated; one saved with an eta beside the noise schedule (which decoding ignored) loads
    without it, and a new config that sets both is refused."""
    from dcssdae.autoencoder import DCSSDAE

    ae = DCSSDAE("tiny-f32c8", "tiny", sampler={"method": "nesterov", "steps": 4})
    assert ae.sampler["schedule"] == "noise" and ae.config()["sampler"]["schedule"] == "noise"
    assert "eta" not in ae.sampler
    old = {**ae.config(), "sampler": {"method": "gd", "steps": 8, "eta": 0.5}}
    assert DCSSDAE.from_config(old).sampler == {"method": "gd", "steps": 8, "eta": 0.5, "schedule": "constant"}
    saved = {**ae.config(), "sampler": {"method": "gd", "steps": 8, "eta": 0.5, "schedule": "noise", "power": 2.0}}
    assert DCSSDAE.from_config(saved).sampler == {"method": "gd", "steps": 8, "schedule": "noise", "power": 2.0}
    with pytest.raises(ValueError, match="eta is the step of schedule 'constant'.*drop eta, or set schedule: constant"):
        DCSSDAE("tiny-f32c8", "tiny", sampler={"method": "gd", "steps": 8, "eta": 0.3})


class ConstantDenoiser(torch.nn.Module):
    """A decoder that predicts the image `target` whatever its input (the field lambda (x - target))."""

    image_channels = 3

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)

    def forward(self, x, z, *time):
        return self.target.to(x.dtype).expand_as(x)


def test_a_bf16_model_samples_in_float32():
    """`ae.to(torch.bfloat16)`: the network runs in bf16, the sampler's state stays float32. With the EqM paper's
    small constant steps (eta 0.01, 300 steps: x - target shrinks by 0.98 per step) a bf16 state stops moving once a
    step is below its resolution (about 0.1 from the target); the bf16 decode must equal the float32 decode's
    estimate within bf16 rounding, and is returned in bf16."""
    from dcssdae.autoencoder import DCSSDAE

    target = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).bfloat16().float()
    ae = DCSSDAE("tiny-f32c8", "tiny", sampler={"method": "gd", "schedule": "constant", "eta": 0.01, "steps": 300})
    ae.decoder = ConstantDenoiser(target)
    half = copy.deepcopy(ae).to(torch.bfloat16)
    z = torch.randn(2, 8, 1, 1)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, low = ae.decode(z, noise=noise), half.decode(z, noise=noise)
    torch.testing.assert_close(full, target + 0.98**300 * (noise - target), rtol=0, atol=1e-5)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full.bfloat16().float(), rtol=0, atol=0.008)  # <= one bf16 step at |x| < 2


def test_a_one_step_model_takes_a_step_count_as_the_default_sampler():
    """A model configured to decode in one step (a distilled student) still decodes with N > 1 steps when asked
    (`compare_models.py MODEL@16`, validation's extra columns): the default sampling schedule at that count; other
    methods and settings stay checked."""
    from dcssdae.autoencoder import DCSSDAE

    model = DCSSDAE("tiny-f8c4", "tiny", corruption=EquilibriumMatching("linear"), sampler={"method": "one_step"})
    assert model.sampler_settings()["method"] == "one_step"
    assert model.sampler_settings(steps=16) == model.default_sampler(16)
    assert model.sampler_settings(steps=16)["method"] == "gd" and model.sampler_settings(steps=16)["schedule"] == "noise"
    assert model.sampler_settings(steps=1)["method"] == "one_step"
    assert model.sampler_settings(steps=4, method="nesterov")["steps"] == 4
    with pytest.raises(ValueError, match="unknown setting"):
        model.sampler_settings(steps=4, bogus=1)


# ----------------------------------------------------------------------------------------------------------------
# Anchored sampling: the coarse scales from the first estimate (the posterior mean), the fine scales sampled.

ANCHOR = 4


def _image_field(field, shape):
    return lambda y: field(y.flatten(1)).view(shape)


@pytest.mark.parametrize("method, settings", [
    ("gd", {"steps": 16}), ("nesterov", {"steps": 16}), ("adaptive", {"max_steps": 16, "threshold": 1e-9}),
])
def test_anchor_keeps_the_mean_at_coarse_scales_and_samples_the_fine_ones(gaussian, method, settings):
    """On the exact field of x ~ N(mu, 0.3^2 I) shaped as images (16, 5, 20, 20): the anchored sample's coarse part
    (low_pass by 4) is the mean's, its fine part keeps the spread of the fine part of true samples within 10%, and
    without the anchor the coarse part spreads like a true sample's."""
    mu, noise = gaussian
    shape = (16, 5, 20, 20)
    field = _image_field(gaussian_field(EquilibriumMatching(), mu, SIGMA), shape)
    mu_img = mu.view(1, *shape[1:])
    white = SIGMA * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    true_coarse = low_pass(white, ANCHOR).std().item()
    true_fine = (white - low_pass(white, ANCHOR)).std().item()
    x, nfe = sample(field, noise.view(shape), method, anchor=ANCHOR, **settings)
    e = x - mu_img
    coarse, fine = low_pass(e, ANCHOR), e - low_pass(e, ANCHOR)
    assert coarse.std().item() < 0.1 * true_coarse, (coarse.std().item(), true_coarse)
    assert fine.std().item() == pytest.approx(true_fine, rel=0.1), (fine.std().item(), true_fine)
    assert (nfe <= 16).all() and (method == "adaptive" or (nfe == 16).all())
    free = sample(field, noise.view(shape), method, **settings)[0] - mu_img
    assert low_pass(free, ANCHOR).std().item() == pytest.approx(true_coarse, rel=0.15)


def test_the_last_step_lands_on_the_latest_estimate_and_the_anchor_moves_its_coarse_part():
    """With a field whose estimate jumps from `target` (first call) to -target, every method without an anchor ends
    on the latest estimate, -target; with the anchor, on that estimate with its coarse part moved to the first one's;
    with one step the anchor has nothing to replace (the first estimate is the reference)."""
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    calls = []

    def field(x):  # estimate = target at the first call, then a different image: 2 * (x - x0_hat)
        calls.append(1)
        return 2.0 * (x - (target if len(calls) == 1 else -target))

    for method, settings in (("gd", {}), ("nesterov", {}), ("nesterov", {"form": "eqm"}), ("adaptive", {})):
        calls.clear()
        torch.testing.assert_close(sample(field, noise, method, **settings)[0], -target, atol=1e-5, rtol=0)
    calls.clear()
    x, _ = sample(field, noise, "gd", steps=8, anchor=4)
    # the last step lands on the anchored estimate: -target + low_pass(target - (-target))
    torch.testing.assert_close(x, -target + low_pass(2 * target, 4), atol=1e-5, rtol=0)
    calls.clear()
    torch.testing.assert_close(sample(field, noise, "gd", steps=1, anchor=4)[0], target)
