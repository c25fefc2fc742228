"""Samplers: pure functions from noise to an image. Same `noise` (and a deterministic network) in, same image out;
no randomness and no state inside. One entry point:

    x, nfe = sample(fn, noise, method, context=(), **settings)

* `fn` is the network with everything but its input bound: `fn(x, *context)` for the Equilibrium Matching methods
  (`gd`, `nesterov`, `adaptive`, `one_step`) and `fn(x, *context, t)` for flow matching (`euler`), t a (B,) tensor.
* `context` holds per-sample tensors (batch first, e.g. the latent z) that the sampler passes after x and indexes
  together with x when it evaluates only part of the batch (`adaptive`). A closure with z bound
  (`fn = lambda x: decoder(x, z)`) is fine for the fixed-step methods; under `adaptive` the batch shrinks, so pass
  per-sample inputs through `context` (`sample(decoder, noise, "adaptive", context=(z,))`).
* `nfe` is a (B,) long tensor: network evaluations spent on each sample.

Settings are keyword arguments checked against the method (unknown names raise), each with one meaning; a setting
the chosen schedule would ignore raises (e.g. `eta` under schedule "noise", `power` under "constant"). Step sizes
may be Python numbers or tensors (0-d or one per sample, (B,)): the public DC-SSDAE sampler crashed on a float step
(`float.reshape`).

* `eta`: the descent step of schedule "constant" and of `one_step`, x <- x - eta f(x) (the EqM paper's descent).
* `step_to_data`: s(gamma) = (1 - gamma) / c(gamma), the step that moves x_gamma onto the one-step estimate x0_hat
  (a number, a tensor or a function of gamma; default 0.5 = 1 / lambda of the default EquilibriumMatching).
  Schedule "noise" takes its steps from it and from the noise grid; every method forms its one-step estimates with it.

Equilibrium Matching descent (Wang & Du 2025, Sec. 4; sign convention in `dcssdae.objectives`): the field f points
away from the data, so every method descends, x <- x - eta_k * f(x). The sampler never sees gamma: fn(x) is all it
has. With the linear decay c(gamma) = lambda * (1 - gamma) the ideal field is lambda * (x - E[x0 | x]), so one step
of 1 / lambda (`EquilibriumMatching().step_to_data(0)` = 0.5, the default step_to_data) jumps to the posterior mean
E[x0 | x]: the data itself only for a point mass, otherwise the blurry average, from which constant steps barely
move (on the exact field of a Gaussian with std 0.3 the output spread is 0.001 after one step, 0.13 after 8 and
0.21 after 32 constant steps). The step-size schedule `noise` (default of gd / nesterov / adaptive) keeps part of
the noise at every step: on t_k = (1 - k/N)^power, eta_k = (1 - t_{k+1}/t_k) * s(1 - t_k), the DDIM / Euler update
(see `gradient_descent`); s = `step_to_data` (the corruption's (1 - gamma) / c(gamma), which `DCSSDAE.decode`
passes). On a Gaussian with known levels the spread kept is `ddim_gaussian_spread`: 16 steps at power 2 keep 91% of
it (on the exact time-free field of a 2000-dimensional one, 96%). `t_min` puts a floor under the evaluated levels (`noise_grid`). Under `noise` the last step of every
method (t_N = 0) returns the one-step estimate at the last evaluated point: a clean image, no noise left.
`constant` keeps eta at every step (the EqM paper: eta = 0.0017 and hundreds of steps) and returns the last iterate.

`anchor` (gd / nesterov / adaptive; 0 = off) samples only the fine scales: the first evaluation, at pure noise, gives
the one-step estimate, the posterior mean E[x | z]; at every later step the coarse part of the estimate x0_hat (its
bicubic resampling `anchor` times smaller) is replaced by the first estimate's, as ILVR conditions a sampler on a
reference image's low frequencies (Choi et al. 2021, Eq. 6-7), here the model's own mean. For an under-trained
decoder whose samples drift from the mean at scales that z nearly fixes (the CPU quick-start's, at 3-6 px); see
`gradient_descent`.
"""

import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Literal

import torch

Tensor = torch.Tensor

# Step to the data s when no `step_to_data` is given (and the step of `one_step` and of schedule "constant" when
# no `eta` is given): 1 / lambda for the default EquilibriumMatching (linear decay, lambda = 2).
DEFAULT_STEP_TO_DATA = 0.5
DEFAULT_POWER = 2.0  # exponent of the noise grid t_k = (1 - k/N)^power


# ----------------------------------------------------------------------------------------------------------------
# Helpers: setting checks, per-sample step sizes, evaluation with shape check.


def _check_steps(steps: int, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")
    return steps


def _step_size(eta: float | Tensor, noise: Tensor, name: str = "eta") -> Tensor:
    """A step size as a (B,) float tensor on noise's device; accepts a number, a 0-d tensor or one per sample."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float, Tensor)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(eta).__name__}")
    eta = torch.as_tensor(eta, dtype=noise.dtype, device=noise.device)
    if eta.ndim == 0:
        eta = eta.expand(noise.shape[0])
    if eta.shape != (noise.shape[0],):
        raise ValueError(f"{name} must be a number or one value per sample ({noise.shape[0]},); got {tuple(eta.shape)}")
    if not bool((eta > 0).all()):
        raise ValueError(f"{name} must be > 0")
    return eta


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast against x."""
    return v.view(-1, *([1] * (x.ndim - 1)))


def _evaluate(fn: Callable, x: Tensor, context: Sequence[Tensor], *extra) -> Tensor:
    out = fn(x, *context, *extra)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"fn must return a tensor shaped like its input {tuple(x.shape)}; got {got}")
    return out.to(x.dtype)  # the sampler's state keeps its dtype (float32 for a half-precision network)


def _nfe(noise: Tensor, count: int) -> Tensor:
    return torch.full((noise.shape[0],), count, dtype=torch.long, device=noise.device)


# ----------------------------------------------------------------------------------------------------------------
# Anchoring the coarse scales to the first estimate (ILVR, Choi et al. 2021, Eq. 6-7, with the posterior mean as the
# reference image).


def _check_anchor(anchor: float, noise: Tensor) -> float:
    if isinstance(anchor, bool) or not isinstance(anchor, (int, float)) or not (anchor == 0 or anchor >= 1):
        raise ValueError(f"anchor must be 0 (off) or a number >= 1 (the low-pass's side reduction), got {anchor!r}")
    if anchor and (noise.ndim != 4 or min(noise.shape[-2:]) < anchor):
        raise ValueError(f"anchor={anchor} needs images (B, C, H, W) with H, W >= anchor; got {tuple(noise.shape)}")
    return float(anchor)


def low_pass(x: Tensor, factor: float) -> Tensor:
    """The coarse part of images x (B, C, H, W): bicubic (antialiased) down by `factor` and bicubic back up."""
    h, w = x.shape[-2:]
    small = torch.nn.functional.interpolate(x.float(), size=(max(1, round(h / factor)), max(1, round(w / factor))),
                                            mode="bicubic", antialias=True)
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic").to(x.dtype)


def _anchored(g: Tensor, x: Tensor, s: Tensor, ref: Tensor, anchor: float) -> Tensor:
    """The field whose one-step estimate x - s g' has the coarse scales of `ref` and the fine scales of x - s g:
    g' = g - low_pass(ref - (x - s g)) / s."""
    s = _bcast(s, x)
    return g - low_pass(ref - (x - s * g), anchor) / s


def _anchor(g: Tensor, x: Tensor, s: Tensor, ref: Tensor | None, anchor: float) -> tuple[Tensor, Tensor | None]:
    """(g, ref) for one evaluation g = f(x): unchanged when `anchor` is 0; at the first evaluation (ref None) the
    reference becomes its one-step estimate x - s g; later, g is `_anchored` to the reference."""
    if not anchor:
        return g, ref
    if ref is None:
        return g, x - _bcast(s, x) * g
    return _anchored(g, x, s, ref, anchor), ref


# ----------------------------------------------------------------------------------------------------------------
# Step-size schedules of the EqM descent (DDIM, Song et al. 2021, Eq. 12 with eta = 0, on the grid of Karras et al.
# 2022 / SSDD's shifted grid t_k = (1 - k/N)^p).

Schedule = Literal["constant", "noise"]
SCHEDULES = ("constant", "noise")
StepToData = Callable[[Tensor], Tensor] | float | Tensor | None


def noise_grid(steps: int, power: float = DEFAULT_POWER, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32, t_min: float = 0.0) -> Tensor:
    """Remaining-noise fractions t_k = t_min + (1 - t_min) (1 - k/N)^power for k = 0..N-1 and t_N = 0: t_0 = 1 (pure
    noise), t_N = 0 (the data). `t_min` > 0 is a floor under the levels the network is evaluated at (the last one
    is t_min + (1 - t_min) / N^power), from which the last step jumps to the one-step estimate, as the grids of
    Karras et al. 2022 (sigma_min, then 0) do."""
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must lie in [0, 1), got {t_min}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64).pow(power)
    t = t_min + (1 - t_min) * t
    t[-1] = 0.0
    return t.to(dtype)


def ddim_gaussian_spread(sigma: float, steps: int, power: float = DEFAULT_POWER, t_min: float = 0.0) -> float:
    """The spread (std of x - mu per dimension) of `gradient_descent` on the noise schedule, from unit noise, on the
    ideal field of x ~ N(mu, sigma^2 I) under the linear decay when the level is known (high dimensions).

    At remaining noise t (gamma = 1 - t) the estimate is E[x | y] = mu + a (y - gamma mu), a = gamma sigma^2 /
    (gamma^2 sigma^2 + t^2). With e_k = y_k - gamma_k mu the update y_{k+1} = r y_k + (1 - r) E[x | y_k],
    r = t_{k+1} / t_k, gives e_{k+1} = (r + (1 - r) a_k) e_k (the mu terms cancel: r gamma_k + 1 - r = gamma_{k+1}),
    e_0 = noise and x - mu = e_N: the output is mu + m * noise with m the product of those factors.
    """
    t = noise_grid(steps, power, dtype=torch.float64, t_min=t_min).tolist()
    m = 1.0
    for t_k, t_next in itertools.pairwise(t):
        gamma, r = 1 - t_k, t_next / t_k
        m *= r + (1 - r) * gamma * sigma**2 / (gamma**2 * sigma**2 + t_k**2)
    return m


def _data_step(step_to_data: StepToData, gamma: Tensor, like: Tensor) -> Tensor:
    """s(gamma) as a (B,) tensor like `like`: `step_to_data` called at gamma, or the number / tensor itself (the
    default 0.5 when None)."""
    if step_to_data is None:
        step_to_data = DEFAULT_STEP_TO_DATA
    if not callable(step_to_data):
        return _step_size(step_to_data, like, "step_to_data")
    s = torch.as_tensor(step_to_data(gamma), device=like.device).to(like.dtype)
    if not bool((s > 0).all()):
        raise ValueError(f"step_to_data must be > 0, got {s.min().item()} at gamma {float(gamma):.4f}")
    return s.expand(like.shape[0])


def _schedule_settings(schedule: str, eta, power, t_min: float) -> float:
    """Refuse a setting the schedule would ignore; returns the noise grid's power (unused by "constant")."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if schedule == "noise" and eta is not None:
        raise ValueError("eta is the step of schedule='constant' (x <- x - eta f(x), the EqM paper's descent); "
                         "schedule='noise' takes its steps from the noise grid and step_to_data (the corruption's "
                         "(1 - gamma) / c(gamma)): drop eta, or pass schedule='constant'")
    if schedule == "constant" and power is not None:
        raise ValueError(f"power={power} shapes the noise grid of schedule='noise'; schedule='constant' has none: "
                         "drop power, or pass schedule='noise'")
    if schedule == "constant" and t_min:
        raise ValueError(f"t_min={t_min} needs schedule='noise' (the constant schedule has no noise grid)")
    return DEFAULT_POWER if power is None else power


def step_sizes(schedule: str, steps: int, noise: Tensor, eta: float | Tensor | None = None,
               power: float | None = None, step_to_data: StepToData = None,
               t_min: float = 0.0) -> list[tuple[Tensor, Tensor]]:
    """[(eta_k, s_k)] for k = 0..steps-1, each a (B,) tensor like `noise`: the step size and the step to the data
    s(gamma_k).

    `constant`: eta_k = eta (default s(0)), s_k = s(0). `noise`: t_k = `noise_grid(steps, power, t_min=t_min)`,
    gamma_k = 1 - t_k, s_k = s(gamma_k) and eta_k = (1 - t_{k+1} / t_k) * s_k; eta is refused there (its steps
    follow from the grid).
    """
    power = _schedule_settings(schedule, eta, power, t_min)
    if schedule == "constant":
        s = _data_step(step_to_data, torch.tensor(0.0, dtype=torch.float64), noise)
        return [(s if eta is None else _step_size(eta, noise), s)] * steps
    t = noise_grid(steps, power, dtype=torch.float64, t_min=t_min)
    out = []
    for t_k, t_next in itertools.pairwise(t):
        s = _data_step(step_to_data, 1 - t_k, noise)
        out.append(((1 - t_next / t_k).to(noise.dtype) * s, s))
    return out


# ----------------------------------------------------------------------------------------------------------------
# EqM gradient descent (Wang & Du 2025, Eq. 7) with a step-size schedule.


def gradient_descent(
    fn,
    noise,
    context=(),
    *,
    steps: int = 8,
    eta: float | Tensor | None = None,
    schedule: Schedule = "noise",
    power: float | None = None,
    step_to_data: StepToData = None,
    t_min: float = 0.0,
    anchor: float = 0.0,
):
    """x_{k+1} = x_k - eta_k * f(x_k), `steps` times from x_0 = noise, eta_k from `step_sizes(schedule, ...)`.

    Under `noise` (power 2 unless given) this is the DDIM / Euler update on the remaining-noise grid t_k, for every
    decay. A sample at noise level gamma_k = 1 - t_k, y = gamma_k x + t_k noise, has target field f* = c(gamma_k)
    (noise - x) = c(gamma_k) / t_k * (y - x), so x0_hat = y - s(gamma_k) f with s = (1 - gamma) / c(gamma) and

        x_{k+1} = (t_{k+1}/t_k) y + (1 - t_{k+1}/t_k) x0_hat = y - (1 - t_{k+1}/t_k) s(gamma_k) f(y),

    which keeps the fraction t_{k+1}/t_k of the current noise and moves the rest to the one-step estimate; the last
    step (t_N = 0) lands on it. On a Gaussian the result's spread is `ddim_gaussian_spread`.
    Linear decay: s = 1 / lambda for every gamma (so `step_to_data` may be a number).
    Truncated decay: c = lambda below a, so s = (1 - gamma) / lambda there (the step shrinks with the noise), and
    s = (1 - a) / lambda above a. Piecewise decay: s = (1 - gamma) / (lambda (b - (b - 1) gamma / a)) below a,
    (1 - a) / lambda above. For those two the ideal field mixes levels, f(y) = E[c / (1 - gamma) (y - x) | y],
    so the update is exact only where the level posterior is sharp (high dimensions).
    Under `constant` (eta every step, default s(0); the EqM paper's 0.0017 with hundreds of steps) a step of
    1 / lambda jumps to the posterior mean E[x | y] and later steps barely move from it: the output collapses to the
    blurry mean.

    `anchor` > 0 (images only): the first evaluation's estimate x0_hat_0 = noise - s_0 f(noise) (the posterior mean
    E[x | z]) is kept as a reference, and every later step uses x0_hat_k + low_pass(x0_hat_0 - x0_hat_k) in place of
    x0_hat_k (`low_pass`: bicubic down by `anchor` and back up), i.e. f is replaced by f - low_pass(x0_hat_0 -
    x0_hat_k) / s_k. The sample keeps the mean's content coarser than `anchor` pixels and draws the finer detail.
    No extra evaluation. On the exact field of a Gaussian the sample's coarse part is the mean's and its fine part
    keeps the true spread (`tests/test_sampling.py`).
    """
    steps = _check_steps(steps)
    anchor = _check_anchor(anchor, noise)
    x, ref = noise, None
    for eta_k, s_k in step_sizes(schedule, steps, noise, eta, power, step_to_data, t_min):
        g, ref = _anchor(_evaluate(fn, x, context), x, s_k, ref, anchor)
        x = x - _bcast(eta_k, x) * g
    return x, _nfe(noise, steps)


# ----------------------------------------------------------------------------------------------------------------
# Nesterov accelerated descent (Nesterov 1983; Sutskever et al. 2013, Eq. 3-4) and the EqM code's NAG-GD.


def nesterov(
    fn,
    noise,
    context=(),
    *,
    steps: int = 8,
    eta: float | Tensor | None = None,
    mu: float = 0.3,
    form: Literal["standard", "eqm"] = "standard",
    schedule: Schedule = "noise",
    power: float | None = None,
    step_to_data: StepToData = None,
    t_min: float = 0.0,
    anchor: float = 0.0,
):
    """Accelerated descent with momentum mu in [0, 1); one evaluation per step.

    `standard` (Nesterov): evaluate at the extrapolated point y_k = x_k + mu * (x_k - x_{k-1}) and step from it,
    x_{k+1} = y_k - eta * f(y_k). On a quadratic with curvature L, a = eta * L, the error obeys
    e_{k+1} = (1 - a) * ((1 + mu) e_k - mu e_{k-1}), which contracts faster than GD's factor 1 - a whenever
    mu < 1 - a (small steps, the many-step regime); at a = 1 both are exact after one step.

    `eqm` (NAG-GD of the official EqM sampler, written with our descent sign): the same look-ahead point
    y_k = x_k - eta * mu * g_{k-1} (= x_k + mu * (x_k - x_{k-1})), g_k = f(y_k), but the step is taken from x_k:
    x_{k+1} = x_k - eta * g_k. Its quadratic error recursion e_{k+1} = (1 - a - a*mu) e_k + a*mu e_{k-1} has a root
    above 1 - a for any 0 < a < 1, i.e. it is slower than plain GD there, and with a = 1 (the exact one-step eta)
    it leaves mu * e_0 after two steps where GD has converged.
    It is kept to compare with the EqM paper's numbers (eta = 0.0017, mu = 0.3, schedule `constant`).

    Under the `noise` schedule the momentum moves along the noise grid (see `gradient_descent`): x_k sits at
    remaining noise t_k and x_k - x_{k-1} = (t_k - t_{k-1}) (noise - x) along a DDIM path, so the look-ahead
    y_k = x_k + mu_k (x_k - x_{k-1}) sits at t_y = t_k - mu_k (t_{k-1} - t_k); `standard` then takes the DDIM step
    from t_y to t_{k+1}, eta_k = (1 - t_{k+1} / t_y) s(1 - t_y). Using the step of t_k there instead overshoots the
    noise the look-ahead already removed and shrinks the sample spread. mu_k = min(mu, (t_k - t_{k+1}) /
    (2 (t_{k-1} - t_k))) keeps the look-ahead short of the next level. `eqm` steps from x_k with gd's eta_k, except
    at the last step (t_N = 0), where both forms return the one-step estimate at the look-ahead, y - s(1 - t_y) f(y)
    (x_k - s f(y) would keep the momentum's displacement x_k - y = -mu_k (x_k - x_{k-1}), i.e. noise).
    `anchor` as in `gradient_descent`, on the estimate at the evaluated point y_k.
    """
    steps = _check_steps(steps)
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"mu must lie in [0, 1), got {mu}")
    if form not in ("standard", "eqm"):
        raise ValueError(f"unknown nesterov form {form!r}; known: standard, eqm")
    anchor = _check_anchor(anchor, noise)
    sizes = step_sizes(schedule, steps, noise, eta, power, step_to_data, t_min)
    t = noise_grid(steps, DEFAULT_POWER if power is None else power, dtype=torch.float64, t_min=t_min) if schedule == "noise" else None
    x = x_prev = noise
    ref = None
    for k, (eta_k, s_k) in enumerate(sizes):
        mu_k = mu
        if t is not None and k > 0:
            mu_k = min(mu, 0.5 * float((t[k] - t[k + 1]) / (t[k - 1] - t[k])))
        y = x + mu_k * (x - x_prev)                          # look-ahead point (both forms)
        g = _evaluate(fn, y, context)
        last = t is not None and k == steps - 1              # t_N = 0: return the estimate at y
        step_from = y if form == "standard" or last else x
        if t is not None and k > 0 and (form == "standard" or last):
            t_y = t[k] - mu_k * (t[k - 1] - t[k])            # the look-ahead's remaining noise
            s_k = _data_step(step_to_data, 1 - t_y, noise)
            eta_k = (1 - t[k + 1] / t_y).to(noise.dtype) * s_k
        g, ref = _anchor(g, y, s_k, ref, anchor)
        x_prev, x = x, step_from - _bcast(eta_k, x) * g
    return x, _nfe(noise, steps)


# ----------------------------------------------------------------------------------------------------------------
# Adaptive compute (Wang & Du 2025, Sec. 4, Alg. 2): each sample stops on its own once its estimate has settled.


def adaptive(
    fn,
    noise,
    context=(),
    *,
    eta: float | Tensor | None = None,
    threshold: float = 0.01,
    max_steps: int = 32,
    schedule: Schedule = "noise",
    power: float | None = None,
    step_to_data: StepToData = None,
    t_min: float = 0.0,
    anchor: float = 0.0,
):
    """`gd` on the schedule of `max_steps` steps, stopping each sample once its one-step estimate has settled.

    Evaluation k gives f(x_k), the one-step estimate x0_hat_k = x_k - s_k f(x_k) and the descent step, which
    removes the fraction r_k = eta_k / s_k of the remaining noise t_k (t_0 = 1, t_{k+1} = (1 - r_k) t_k: the grid of
    `noise`). A sample stops, returning x0_hat_k (its estimate at the data end), once both predictions of how far
    its estimate would still move before the end (RMS over its elements, with c_k = RMS(x0_hat_k - x0_hat_{k-1}))
    are below `threshold`:

    * at the rate of the last step: c_k * (1 - r_{k-1}) / r_{k-1} (the estimate moving linearly with the noise
      removed), the remaining move of content the estimate already resolves;
    * sqrt(c_k / (u_k - u_{k-1})), u = (1 - t) / t the signal-to-noise ratio: the content still unresolved. On
      Gaussian data of variance lambda a direction the estimate has not resolved yet (u^2 lambda << 1) moves as
      u lambda and still has its whole spread sqrt(lambda) to go; its rate per unit of u is lambda, so the square
      root of the rate is that spread. (On data of small, correlated variance, as p(x | z) of an image, the first
      rule alone fires at the first check, on the posterior mean.)

    The EqM paper's rule, stop when ||f|| is small, fires at the blurry posterior mean that one large step reaches
    (f is small at a clean-looking image) and is not used. Each round evaluates only the running samples (the batch
    shrinks; `context` is indexed along). At most `max_steps` evaluations per sample; nfe[i] = evaluations of sample
    i; a sample that runs them all ends as `gd` does. `anchor` as in `gradient_descent` (the estimates compared are
    the anchored ones).
    """
    anchor = _check_anchor(anchor, noise)
    max_steps = _check_steps(max_steps, "max_steps")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    sizes = step_sizes(schedule, max_steps, noise, eta, power, step_to_data, t_min)
    x, nfe = noise, torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device)
    x0_prev = torch.zeros_like(noise)
    active = torch.arange(noise.shape[0], device=noise.device)
    t = torch.ones(noise.shape[0], dtype=torch.float64, device=noise.device)  # remaining noise of x_k
    t_prev = r_prev = ref = None
    for k, (eta_k, s_k) in enumerate(sizes):
        x_active = x.index_select(0, active)
        g = _evaluate(fn, x_active, [c.index_select(0, active) for c in context])
        if anchor and k == 0:
            ref = x_active - _bcast(s_k, x_active) * g
        elif anchor:
            g = _anchored(g, x_active, s_k.index_select(0, active), ref.index_select(0, active), anchor)
        nfe = nfe.index_add(0, active, torch.ones_like(active))
        x0_hat = x_active - _bcast(s_k.index_select(0, active), x_active) * g
        x = x.index_copy(0, active, x_active - _bcast(eta_k.index_select(0, active), x_active) * g)
        if r_prev is not None and k < max_steps - 1:
            change = (x0_hat - x0_prev.index_select(0, active)).detach().double().flatten(1).square().mean(1).sqrt()
            r = r_prev.index_select(0, active)
            resolved = change * (1 - r) / r
            unresolved = (change / (1 / t.index_select(0, active) - 1 / t_prev.index_select(0, active))).sqrt()
            settled = torch.maximum(resolved, unresolved) < threshold
            if settled.any():
                done = active[settled]
                x = x.index_copy(0, done, x0_hat[settled])
                active, x0_hat = active[~settled], x0_hat[~settled]
        x0_prev = x0_prev.index_copy(0, active, x0_hat)
        r_prev = (eta_k / s_k).double().clamp(max=1.0)
        t_prev, t = t, t * (1 - r_prev)
        if active.numel() == 0:
            break
    return x, nfe


# ----------------------------------------------------------------------------------------------------------------
# One step from pure noise: x0_hat = noise - f(noise) * (1 - 0) / c(0) (the single-step decoder).


def one_step(fn, noise, context=(), *, eta: float | Tensor = DEFAULT_STEP_TO_DATA):
    """x = noise - eta * f(noise). With eta = 1 / c(0) (`EquilibriumMatching.step_to_data(0)`) and an ideal field this
    is the posterior mean E[x | noise] (for the decoder, E[x | noise, z]): the data itself only for a point mass,
    otherwise the blurry average. A distilled student is trained to make this one step a sample."""
    eta = _step_size(eta, noise)
    return noise - _bcast(eta, noise) * _evaluate(fn, noise, context), _nfe(noise, 1)


# ----------------------------------------------------------------------------------------------------------------
# Flow-matching Euler from t = 1 to t = 0 on a shifted grid (SSDD: t_k = (1 - k/N) ** shift).


def time_grid(steps: int, shift: float = 2.0, device: torch.device | None = None) -> Tensor:
    """t_k = (1 - k/N) ** shift, k = 0..N: 1 -> 0, denser near t = 0 (the clean end) when shift > 1."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device) ** shift


def euler(fn, noise, context=(), *, steps: int = 8, shift: float = 2.0):
    """x_{t'} = x_t + (t - t') * v(x_t, t) with v = x - noise (t = 1 is noise), on `time_grid(steps, shift)`.

    shift 2 as in SSDD's released configs (shift 1 is a uniform grid). A single step from t = 1 gives x0_hat =
    noise + v(noise, 1), the FM one-step decoder.
    """
    steps = _check_steps(steps)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    grid = time_grid(steps, shift, noise.device)  # float32: a half-precision model still sees t as trained
    x = noise
    for t, t_next in itertools.pairwise(grid):
        x = x + (t - t_next).to(noise.dtype) * _evaluate(fn, x, context, t.expand(noise.shape[0]))
    return x, _nfe(noise, steps)


# ----------------------------------------------------------------------------------------------------------------
# The entry point.

METHODS: dict[str, Callable] = {
    "gd": gradient_descent,
    "nesterov": nesterov,
    "adaptive": adaptive,
    "one_step": one_step,
    "euler": euler,
}


def settings_of(method: str) -> dict[str, object]:
    """The settings a method takes, with their defaults."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; known: {', '.join(METHODS)}")
    params = inspect.signature(METHODS[method]).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def sample(
    fn: Callable[..., Tensor],
    noise: Tensor,
    method: str,
    *,
    context: Sequence[Tensor] = (),
    **settings,
) -> tuple[Tensor, Tensor]:
    """Run `method` from `noise`; returns (x, nfe) with nfe a (B,) long tensor of evaluations per sample.

    Runs under the caller's grad mode: wrap in torch.no_grad() for inference.
    """
    known = settings_of(method)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for sampling method {method!r}; it takes: {', '.join(known)}")
    if not isinstance(noise, Tensor) or noise.ndim < 2:
        raise ValueError("noise must be a batched tensor (B, ...)")
    context = tuple(context)
    for i, c in enumerate(context):
        if not isinstance(c, Tensor) or c.shape[:1] != noise.shape[:1]:
            raise ValueError(f"context[{i}] must be a tensor with batch size {noise.shape[0]} first")
    return METHODS[method](fn, noise, context, **settings)
