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

Settings are keyword arguments checked against the method (unknown names raise). Step sizes may be Python numbers
or tensors (0-d or one per sample, (B,)): the public DC-SSDAE sampler crashed on a float step (`float.reshape`).

Equilibrium Matching descent (Wang & Du 2025, Sec. 4; sign convention in `dcssdae.objectives`): the field f points
away from the data, so every method descends, x <- x - eta_k * f(x). The sampler never sees gamma: fn(x) is all it
has. With the linear decay c(gamma) = lambda * (1 - gamma) the ideal field is lambda * (x - E[x0 | x]), so one step
of eta = 1 / lambda (`EquilibriumMatching().step_to_data(0)` = 0.5, the default eta here) jumps to the posterior mean
E[x0 | x]: the data itself only for a point mass, otherwise the blurry average, from which constant steps barely
move (on the exact field of a Gaussian with std 0.3 the output spread is 0.001 after one step, 0.13 after 8 and
0.21 after 32 constant steps). The step-size schedule `noise` (default of gd / nesterov / adaptive) keeps part of
the noise at every step: on t_k = (1 - k/N)^power, eta_k = (1 - t_{k+1}/t_k) * s(1 - t_k), the DDIM / Euler update
(see `gradient_descent`); s = `step_to_data` (the corruption's (1 - gamma) / c(gamma), which `DCSSDAE.decode`
passes) or eta. On the same Gaussian: spread 0.25 / 0.27 / 0.29 after 4 / 8 / 16 steps (power 2). `t_min` puts a
floor under the evaluated levels (`noise_grid`; the last step jumps from there to the one-step estimate). `constant`
keeps eta at every step (the EqM paper: eta = 0.0017 and hundreds of steps).

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

# Default step (and step to the data s when no `step_to_data` is given): 1 / lambda for the default
# EquilibriumMatching (linear decay, lambda = 2); see the module docstring.
DEFAULT_ETA = 0.5


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
    return out


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


def noise_grid(steps: int, power: float = 2.0, device: torch.device | None = None,
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


def _data_step(step_to_data: Callable | None, eta: Tensor, gamma: Tensor) -> Tensor:
    """s(gamma) = (1 - gamma) / c(gamma) as a (B,) tensor: the corruption's closed form when given, else eta."""
    if step_to_data is None:
        return eta
    s = torch.as_tensor(step_to_data(gamma), device=eta.device).to(eta.dtype)
    if not bool((s > 0).all()):
        raise ValueError(f"step_to_data must be > 0, got {s.min().item()} at gamma {gamma.item():.4f}")
    return s.expand_as(eta)


def step_sizes(schedule: str, steps: int, eta: Tensor, power: float = 2.0,
               step_to_data: Callable | None = None, t_min: float = 0.0) -> list[tuple[Tensor, Tensor]]:
    """[(eta_k, s_k)] for k = 0..steps-1, each a (B,) tensor: the step size and the step to the data s(gamma_k).

    `constant`: eta_k = eta, and s_k = s(0) (= 1 / c(0)) when `step_to_data` is given, else eta.
    `noise`: t_k = `noise_grid(steps, power, t_min=t_min)`, gamma_k = 1 - t_k, s_k = s(gamma_k) (eta when
    `step_to_data` is None, exact for the linear decay where s = 1 / lambda) and eta_k = (1 - t_{k+1} / t_k) * s_k.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if schedule == "constant":
        if t_min:
            raise ValueError(f"t_min={t_min} needs schedule='noise' (the constant schedule has no noise grid)")
        s = _data_step(step_to_data, eta, torch.tensor(0.0, dtype=torch.float64))
        return [(eta, s)] * steps
    t = noise_grid(steps, power, dtype=torch.float64, t_min=t_min)
    out = []
    for t_k, t_next in itertools.pairwise(t):
        s = _data_step(step_to_data, eta, 1 - t_k)
        out.append(((1 - t_next / t_k).to(eta.dtype) * s, s))
    return out


# ----------------------------------------------------------------------------------------------------------------
# EqM gradient descent (Wang & Du 2025, Eq. 7) with a step-size schedule.


def gradient_descent(
    fn,
    noise,
    context=(),
    *,
    steps: int = 8,
    eta: float | Tensor = DEFAULT_ETA,
    schedule: Schedule = "noise",
    power: float = 2.0,
    step_to_data: Callable | None = None,
    t_min: float = 0.0,
    anchor: float = 0.0,
):
    """x_{k+1} = x_k - eta_k * f(x_k), `steps` times from x_0 = noise, eta_k from `step_sizes(schedule, ...)`.

    Under `noise` this is the DDIM / Euler update on the remaining-noise grid t_k, for every decay. A sample at
    noise level gamma_k = 1 - t_k, y = gamma_k x + t_k noise, has target field f* = c(gamma_k) (noise - x)
    = c(gamma_k) / t_k * (y - x), so x0_hat = y - s(gamma_k) f with s = (1 - gamma) / c(gamma) and

        x_{k+1} = (t_{k+1}/t_k) y + (1 - t_{k+1}/t_k) x0_hat = y - (1 - t_{k+1}/t_k) s(gamma_k) f(y),

    which keeps the fraction t_{k+1}/t_k of the current noise and moves the rest to the one-step estimate.
    Linear decay: s = 1 / lambda for every gamma (so `step_to_data` may be left out: s = eta = 1 / lambda).
    Truncated decay: c = lambda below a, so s = (1 - gamma) / lambda there (the step shrinks with the noise), and
    s = (1 - a) / lambda above a. Piecewise decay: s = (1 - gamma) / (lambda (b - (b - 1) gamma / a)) below a,
    (1 - a) / lambda above. For those two the ideal field mixes levels, f(y) = E[c / (1 - gamma) (y - x) | y],
    so the update is exact only where the level posterior is sharp (high dimensions); t_N = 0 ends on x0_hat.
    Under `constant` (eta every step; the EqM paper's 0.0017 with hundreds of steps) a step of 1 / lambda jumps to
    the posterior mean E[x | y] and later steps barely move from it: the output collapses to the blurry mean.

    `anchor` > 0 (images only): the first evaluation's estimate x0_hat_0 = noise - s_0 f(noise) (the posterior mean
    E[x | z]) is kept as a reference, and every later step uses x0_hat_k + low_pass(x0_hat_0 - x0_hat_k) in place of
    x0_hat_k (`low_pass`: bicubic down by `anchor` and back up), i.e. f is replaced by f - low_pass(x0_hat_0 -
    x0_hat_k) / s_k. The sample keeps the mean's content coarser than `anchor` pixels and draws the finer detail.
    No extra evaluation. On the exact field of a Gaussian the sample's coarse part is the mean's and its fine part
    keeps the true spread (`tests/test_sampling.py`).
    """
    steps, eta = _check_steps(steps), _step_size(eta, noise)
    anchor = _check_anchor(anchor, noise)
    x, ref = noise, None
    for eta_k, s_k in step_sizes(schedule, steps, eta, power, step_to_data, t_min):
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
    eta: float | Tensor = DEFAULT_ETA,
    mu: float = 0.3,
    form: Literal["standard", "eqm"] = "standard",
    schedule: Schedule = "noise",
    power: float = 2.0,
    step_to_data: Callable | None = None,
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
    (2 (t_{k-1} - t_k))) keeps the look-ahead short of the next level. `eqm` steps from x_k with gd's eta_k.
    `anchor` as in `gradient_descent`, on the estimate at the evaluated point y_k.
    """
    steps, eta = _check_steps(steps), _step_size(eta, noise)
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"mu must lie in [0, 1), got {mu}")
    if form not in ("standard", "eqm"):
        raise ValueError(f"unknown nesterov form {form!r}; known: standard, eqm")
    anchor = _check_anchor(anchor, noise)
    sizes = step_sizes(schedule, steps, eta, power, step_to_data, t_min)
    t = noise_grid(steps, power, dtype=torch.float64, t_min=t_min) if schedule == "noise" else None
    x = x_prev = noise
    ref = None
    for k, (eta_k, s_k) in enumerate(sizes):
        mu_k = mu
        if t is not None and k > 0:
            mu_k = min(mu, 0.5 * float((t[k] - t[k + 1]) / (t[k - 1] - t[k])))
        y = x + mu_k * (x - x_prev)                          # look-ahead point (both forms)
        g = _evaluate(fn, y, context)
        if t is not None and form == "standard" and k > 0:
            t_y = t[k] - mu_k * (t[k - 1] - t[k])            # the look-ahead's remaining noise
            s_k = _data_step(step_to_data, eta, 1 - t_y)
            eta_k = (1 - t[k + 1] / t_y).to(eta.dtype) * s_k
        g, ref = _anchor(g, y, s_k, ref, anchor)
        x_prev, x = x, (y if form == "standard" else x) - _bcast(eta_k, x) * g
    return x, _nfe(noise, steps)


# ----------------------------------------------------------------------------------------------------------------
# Adaptive compute (Wang & Du 2025, Sec. 4, Alg. 2): each sample stops on its own once its estimate has settled.


def adaptive(
    fn,
    noise,
    context=(),
    *,
    eta: float | Tensor = DEFAULT_ETA,
    threshold: float = 0.01,
    max_steps: int = 32,
    schedule: Schedule = "noise",
    power: float = 2.0,
    step_to_data: Callable | None = None,
    t_min: float = 0.0,
    anchor: float = 0.0,
):
    """`gd` on the schedule of `max_steps` steps, stopping each sample once its one-step estimate has settled.

    Evaluation k gives f(x_k), the one-step estimate x0_hat_k = x_k - s_k f(x_k) and the descent step. Step k
    removes the fraction r_k = eta_k / s_k of the remaining noise (1 - t_{k+1}/t_k under `noise`), so if the
    estimate kept changing at the rate of the last step it would still move by
    RMS(x0_hat_k - x0_hat_{k-1}) * (1 - r_{k-1}) / r_{k-1} before the end (RMS over a sample's elements). A sample
    stops when that is < threshold and returns x0_hat_k (its estimate at the data end). The EqM paper's rule,
    stop when ||f|| is small, fires at the blurry posterior mean that one large step reaches (f is small at a
    clean-looking image) and is not used. Each round evaluates only the running samples (the batch shrinks;
    `context` is indexed along). At most `max_steps` evaluations per sample; nfe[i] = evaluations of sample i.
    `anchor` as in `gradient_descent` (the estimates compared are the anchored ones).
    """
    eta = _step_size(eta, noise)
    anchor = _check_anchor(anchor, noise)
    max_steps = _check_steps(max_steps, "max_steps")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if schedule == "constant" and step_to_data is None:
        raise ValueError("adaptive with schedule='constant' needs step_to_data (the corruption's (1 - gamma) / "
                         "c(gamma), e.g. EquilibriumMatching().step_to_data) to form its one-step estimates")
    x, nfe = noise, torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device)
    x0_prev = torch.zeros_like(noise)
    active = torch.arange(noise.shape[0], device=noise.device)
    r_prev = None
    for k, (eta_k, s_k) in enumerate(step_sizes(schedule, max_steps, eta, power, step_to_data, t_min)):
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
            change = (x0_hat - x0_prev.index_select(0, active)).detach().float().flatten(1).square().mean(1).sqrt()
            r = r_prev.index_select(0, active).float()
            settled = change * (1 - r) / r < threshold
            if settled.any():
                done = active[settled]
                x = x.index_copy(0, done, x0_hat[settled])
                active, x0_hat = active[~settled], x0_hat[~settled]
        x0_prev = x0_prev.index_copy(0, active, x0_hat)
        r_prev = (eta_k / s_k).clamp(max=1.0)
        if active.numel() == 0:
            break
    return x, nfe


# ----------------------------------------------------------------------------------------------------------------
# One step from pure noise: x0_hat = noise - f(noise) * (1 - 0) / c(0) (the single-step decoder).


def one_step(fn, noise, context=(), *, eta: float | Tensor = DEFAULT_ETA):
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
