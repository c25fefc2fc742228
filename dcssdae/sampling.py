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

Equilibrium Matching descent (Wang & Du 2025, Sec. 4; sign convention in `dcssdae.corruption`): the field f points
away from the data, so every method descends, x <- x - eta * f(x). With the default linear decay
c(gamma) = lambda * (1 - gamma) and a perfect field, one step of eta moves the noise level gamma to
gamma + eta * lambda * (1 - gamma), i.e. it scales the remaining noise 1 - gamma by (1 - eta * lambda): eta = 1 / lambda
(`EquilibriumMatching().step_to_data(0)` = 0.5, the default here) reaches the data in one step and any
0 < eta < 2 / lambda converges geometrically. The sampler never sees gamma: fn(x) is all it has.
"""

import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Literal

import torch

Tensor = torch.Tensor

# Default step: 1 / lambda for the default EquilibriumMatching (linear decay, lambda = 2); see the module docstring.
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
# EqM gradient descent with fixed steps (Wang & Du 2025, Eq. 7).


def gradient_descent(fn, noise, context=(), *, steps: int = 8, eta: float | Tensor = DEFAULT_ETA):
    """x_{k+1} = x_k - eta * f(x_k), `steps` times from x_0 = noise."""
    steps, eta = _check_steps(steps), _step_size(eta, noise)
    x = noise
    for _ in range(steps):
        x = x - _bcast(eta, x) * _evaluate(fn, x, context)
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
    It is kept to compare with the EqM paper's numbers (eta = 0.0017, mu = 0.3).
    """
    steps, eta = _check_steps(steps), _step_size(eta, noise)
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"mu must lie in [0, 1), got {mu}")
    if form not in ("standard", "eqm"):
        raise ValueError(f"unknown nesterov form {form!r}; known: standard, eqm")
    x = x_prev = noise
    for _ in range(steps):
        y = x + mu * (x - x_prev)                            # look-ahead point (both forms)
        g = _evaluate(fn, y, context)
        x_prev, x = x, (y if form == "standard" else x) - _bcast(eta, x) * g
    return x, _nfe(noise, steps)


# ----------------------------------------------------------------------------------------------------------------
# Adaptive compute: descend each sample until ||f(x)|| < threshold (Wang & Du 2025, Sec. 4, Alg. 2).


def adaptive(
    fn,
    noise,
    context=(),
    *,
    eta: float | Tensor = DEFAULT_ETA,
    threshold: float = 0.01,
    max_steps: int = 32,
):
    """Gradient descent that stops each sample on its own once the field there is small.

    Each round evaluates f on the samples still running only (the batch shrinks; `context` is indexed along), takes
    the step with it (the evaluation is paid for, so the step is free), and retires the samples whose
    ||f(x)|| < threshold, where ||.|| is the root mean square over a sample's elements (independent of image size;
    near a data point f ~ c * (x - x*), so the threshold bounds the remaining error at about threshold / lambda).
    At most `max_steps` evaluations per sample. nfe[i] = evaluations spent on sample i.
    """
    eta = _step_size(eta, noise)
    max_steps = _check_steps(max_steps, "max_steps")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    x, nfe = noise, torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device)
    active = torch.arange(noise.shape[0], device=noise.device)
    for _ in range(max_steps):
        x_active = x.index_select(0, active)
        g = _evaluate(fn, x_active, [c.index_select(0, active) for c in context])
        x = x.index_copy(0, active, x_active - _bcast(eta.index_select(0, active), x_active) * g)
        nfe = nfe.index_add(0, active, torch.ones_like(active))
        rms = g.detach().float().flatten(1).square().mean(dim=1).sqrt()
        active = active[rms >= threshold]
        if active.numel() == 0:
            break
    return x, nfe


# ----------------------------------------------------------------------------------------------------------------
# One step from pure noise: x0_hat = noise - f(noise) * (1 - 0) / c(0) (the single-step decoder).


def one_step(fn, noise, context=(), *, eta: float | Tensor = DEFAULT_ETA):
    """x = noise - eta * f(noise); eta = 1 / c(0) (`EquilibriumMatching.step_to_data(0)`) is exact for a perfect
    field of a point mass."""
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
    grid = time_grid(steps, shift, noise.device).to(noise.dtype)
    x = noise
    for t, t_next in itertools.pairwise(grid):
        x = x + (t - t_next) * _evaluate(fn, x, context, t.expand(noise.shape[0]))
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
