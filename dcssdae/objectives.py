"""Corruption processes: how a clean image x and Gaussian noise are mixed into the decoder's input, and what the
decoder must predict. One interface for both objectives, so the system, the sampler settings and the YAML configs
swap them with a `class_path`:

    level  = corruption.sample_level(x)              # (B,)  EqM: gamma ~ U[0,1) ; FM: t ~ logit-normal
    x_t    = corruption.corrupt(x, noise, level)      # decoder input
    out    = decoder(x_t, z, corruption.decoder_time(level))
    pred   = corruption.pred(x_t, out)                # EqM: the field f; FM: the velocity v
    loss   = corruption.loss(pred, corruption.target(x, noise, level))   # (B,) per-sample MSE
    x0_hat = corruption.to_x0(x_t, pred, level)       # one-step estimate for LPIPS / REPA

Sign convention (written once here, used everywhere in dcssdae):

* Equilibrium Matching (Wang & Du, "Equilibrium Matching", 2025, Eq. 3-5): gamma = 1 is data, gamma = 0 is noise,
  x_gamma = gamma * x + (1 - gamma) * noise and the target is f* = (noise - x) * c(gamma). The learnt field points
  *away* from the data (it is the gradient of an energy whose minima are the data), so sampling is gradient
  *descent*, x <- x - eta * f(x) (see `dcssdae.sampling`). The official EqM code regresses the opposite sign
  (x - noise) * c and samples with x <- x + eta * f; the two are the same model up to the sign of f.
* Flow matching (Lipman et al. 2023; the SSDD baseline): t = 1 is noise, x_t = (1 - t) * x + t * noise, the target
  is the velocity v = x - noise and sampling integrates from t = 1 to t = 0.
"""

from typing import Literal

PARAMETERIZATIONS = ("denoiser", "field", "gated")
GATE_BIAS = -4.0  # gated denoiser: logit offset, so that a zero-initialised network starts as a denoiser (s = 0.018)

import torch

DECAYS = ("linear", "truncated", "piecewise")

# Multiplier lambda used when `multiplier` is not given.
# * linear: 2. The linear decay's mean target power is E[c^2] * E|noise - x|^2 = lambda^2 / 3 * E|noise - x|^2; at
#   lambda = sqrt(3) ~ 2 it equals the flow-matching target power E|x - noise|^2, so SSDD's auxiliary-loss weights
#   (0.5 LPIPS, 0.25 REPA), tuned against the FM loss, keep their balance. (The EqM paper's lambda = 4 with its
#   truncated decay gives E[c^2] = 13.9, 14x the FM power.) With this decay the ideal field is exactly
#   lambda * (y - E[x | y]) (see `EquilibriumMatching.step_to_data`), so one descent step of eta = 1 / lambda = 0.5
#   from pure noise lands on the posterior mean E[x | noise]: on the data only when the data is a single point.
# * truncated / piecewise: 4, as in the EqM paper and its code (with a = 0.8).
DEFAULT_MULTIPLIER = {"linear": 2.0, "truncated": 4.0, "piecewise": 4.0}


def _per_sample(level: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Check that `level` is one value per sample, (B,), and view it as (B, 1, 1, ...) to broadcast against x."""
    if level.shape != (x.shape[0],):
        raise ValueError(f"noise level must have shape ({x.shape[0]},), one value per sample; got {tuple(level.shape)}")
    return level.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error in float32: shape (B,)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return (pred.float() - target.float()).square().flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Equilibrium Matching (Wang & Du 2025, Eq. 3-5; decays of Sec. 3.2 and the official code's `get_ct`).


class EquilibriumMatching:
    """Equilibrium Matching: a time-free gradient field whose minima are the data.

    gamma ~ U[0, 1); x_gamma = gamma * x + (1 - gamma) * noise; target f* = (noise - x) * c(gamma); the decoder gets
    no time input. c(1) = 0, so the target field vanishes at the data (the equilibrium).

    Denoiser parameterisation (`pred`): with the linear decay x_gamma - x = (1 - gamma) (noise - x), so
    f* = lambda * (x_gamma - x) exactly, at every gamma. Writing the field as f = k * (x_gamma - D), k = c(0), with D
    the network's output makes D the image prediction: x0_hat = D and the EqM loss is k^2 * |D - x|^2 (a denoiser
    without a noise-level input), and a zero-initialised network starts at a grey image rather than at the noise.
    For the truncated / piecewise decays f* = c(gamma) / (1 - gamma) * (x_gamma - x) depends on gamma, which the
    network never sees, so there the form is a reparameterisation of the same field (any f can still be written
    as k * (x_gamma - D)) and D equals x0_hat only where c(gamma) / (1 - gamma) = c(0), i.e. gamma = 0.
    """

    name = "eqm"
    time_conditioned = False
    training_only = ("noise_power", "uniform_fraction")  # settings that only choose training levels

    def __init__(
        self,
        decay: Literal["linear", "truncated", "piecewise"] = "linear",
        multiplier: float | None = None,
        a: float = 0.8,
        b: float = 1.4,
        parameterization: Literal["denoiser", "field", "gated"] = "denoiser",
        noise_power: float = 1.0,
        uniform_fraction: float = 0.0,
    ):
        """
        Args:
            decay: shape of c(gamma). `linear`: lambda * (1 - gamma) (DC-SSDAE). `truncated`: lambda * min(1,
                (1 - gamma) / (1 - a)) (the EqM paper). `piecewise`: lambda * (b - (b - 1) * gamma / a) for gamma <= a,
                lambda * (1 - gamma) / (1 - a) above (EqM code).
            multiplier: the gradient multiplier lambda. None picks 2 for `linear` (target power equal to flow
                matching's; one descent step of 1/lambda from noise is exact for a point mass) and 4 for the others
                (the EqM paper).
            a: where the truncated / piecewise decays start falling to 0, in (0, 1). EqM paper: 0.8.
            b: value of c(0) / lambda for the piecewise decay, > 0. EqM code: 1.4.
            parameterization: what the network outputs. `denoiser`: an image D, and the field is
                f = c(0) * (x_gamma - D) (exact for the linear decay: D is then x0_hat). `field`: f itself (the EqM
                paper; the behaviour of configs saved before this option, which `build_corruption` keeps).
                `gated`: an image D~ and a gate map s in (0, 1) (one more output channel), D = s * x_gamma +
                (1 - s) * D~, f = c(0) * (x_gamma - D): a denoiser that can pass its input through where it is
                nearly clean (EDM's c_skip, Karras et al. 2022 Eq. 7, without a noise-level input: the network
                judges the level from x_gamma itself).
            noise_power: training noise levels: the noise fraction 1 - gamma = u^p with u ~ U[0, 1). 1 is the EqM
                paper's gamma ~ U[0, 1); p > 1 draws more levels near the data (P(1 - gamma < 0.1) = 0.1^(1/p)),
                where a time-free denoiser must tell residual noise from texture and where the last steps of a
                sampling schedule evaluate it (`dcssdae.sampling`, schedule "noise"); p < 1 draws more levels near
                pure noise (P(1 - gamma > 0.5) = 1 - 0.5^(1/p): 3/4 at p = 0.5, 7/8 at p = 0.33), the levels that
                decide an image's content (the direction of the resolution-dependent shift of Esser et al. 2024,
                Sec. 5.3.2, for a model that decodes larger images than it trained on; the quick-start's p = 0.5 is
                measured in docs/experiments/training_levels.md). Too few levels near the data and the sampler stops sampling: at p = 0.33
                the quick-start's 16-step decodes of one z differ by 0.0002 (pixel std over noise draws, in [0, 1])
                against 0.020 at p = 0.5 and 0.033 at p = 1.
            uniform_fraction: the fraction of training levels drawn from the paper's gamma ~ U[0, 1) instead of
                1 - u^p (a mixture; 0 = all from u^p): with p < 1 it keeps some levels near the data, where the
                sampler's last steps evaluate the network.
        """
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown EqM parameterization {parameterization!r}; known: "
                             f"{', '.join(PARAMETERIZATIONS)}")
        if decay not in DECAYS:
            raise ValueError(f"unknown EqM decay {decay!r}; known: {', '.join(DECAYS)}")
        multiplier = DEFAULT_MULTIPLIER[decay] if multiplier is None else float(multiplier)
        if not multiplier > 0:
            raise ValueError(f"EqM multiplier lambda must be > 0, got {multiplier}")
        if not 0.0 < a < 1.0:
            raise ValueError(f"EqM decay start a must lie in (0, 1), got {a}")
        if not b > 0:
            raise ValueError(f"EqM piecewise value b must be > 0, got {b}")
        if not noise_power > 0:
            raise ValueError(f"EqM noise_power must be > 0, got {noise_power}")
        self.decay, self.multiplier, self.a, self.b = decay, multiplier, float(a), float(b)
        if not 0.0 <= uniform_fraction <= 1.0:
            raise ValueError(f"EqM uniform_fraction must lie in [0, 1], got {uniform_fraction}")
        self.noise_power, self.uniform_fraction = float(noise_power), float(uniform_fraction)
        self.parameterization = parameterization

    def __repr__(self) -> str:
        return (f"EquilibriumMatching(decay={self.decay!r}, multiplier={self.multiplier}, a={self.a}, b={self.b}, "
                f"parameterization={self.parameterization!r}, noise_power={self.noise_power}, "
                f"uniform_fraction={self.uniform_fraction})")

    def sample_level(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """gamma = 1 - u^noise_power, u ~ U[0, 1) (gamma ~ U[0, 1) itself for the default power 1), one per sample,
        or with probability `uniform_fraction` gamma ~ U[0, 1): shape (B,), float32."""
        u = torch.rand(x.shape[0], generator=generator, device=x.device)
        if self.noise_power == 1.0:
            return u
        gamma = 1 - u.pow(self.noise_power)
        if self.uniform_fraction > 0:
            uniform = torch.rand(x.shape[0], generator=generator, device=x.device)
            pick = torch.rand(x.shape[0], generator=generator, device=x.device) < self.uniform_fraction
            gamma = torch.where(pick, uniform, gamma)
        return gamma

    def c(self, gamma: torch.Tensor | float) -> torch.Tensor:
        """The decay c(gamma) >= 0, with c(1) = 0."""
        gamma = torch.as_tensor(gamma, dtype=torch.float32)
        falling = (1 - gamma) / (1 - self.a)
        if self.decay == "linear":
            shape = 1 - gamma
        elif self.decay == "truncated":
            shape = torch.clamp(falling, max=1.0)
        else:
            shape = torch.where(gamma > self.a, falling, self.b - (self.b - 1) * gamma / self.a)
        return self.multiplier * shape

    def step_to_data(self, gamma: torch.Tensor | float) -> torch.Tensor:
        """(1 - gamma) / c(gamma): the descent step that moves x_gamma onto the data under the target field.

        x_gamma - f* * (1 - gamma) / c(gamma) = x. Computed in closed form, so it stays finite at gamma = 1:
        1 / lambda for the linear decay (any gamma); (1 - a) / lambda above a for the truncated and piecewise decays.
        With the linear decay the ideal field is lambda * (y - E[x | y]), so one step of `step_to_data(0)` = 1 / lambda
        lands on the posterior mean E[x | y]: on the data itself only for a point mass (a single data point x*,
        where the field is exactly lambda * (y - x*)). Sampling schedules use it along a noise grid
        (`dcssdae.sampling`, schedule "noise").
        """
        gamma = torch.as_tensor(gamma, dtype=torch.float32)
        if self.decay == "linear":
            return torch.full_like(gamma, 1.0 / self.multiplier)
        below = (1 - gamma) if self.decay == "truncated" else (1 - gamma) / (self.b - (self.b - 1) * gamma / self.a)
        return torch.where(gamma > self.a, torch.full_like(gamma, 1 - self.a), below) / self.multiplier

    def corrupt(self, x: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """x_gamma = gamma * x + (1 - gamma) * noise."""
        gamma = _per_sample(level, x)
        return gamma * x + (1 - gamma) * noise

    @property
    def extra_outputs(self) -> int:
        """Output channels the network needs beyond the image's: 1 (the gate) for `gated`, else 0."""
        return int(self.parameterization == "gated")

    def pred(self, x_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The field f from the network output: `out` itself (`field`), c(0) * (x_t - out) (`denoiser`) or
        c(0) * (1 - s) * (x_t - D~) with out = [D~, logit of s] (`gated`)."""
        if self.parameterization == "field":
            return out
        k = 1 / self.step_to_data(0.0).item()  # c(0), in closed form
        if self.parameterization == "gated":
            channels = x_t.shape[1]
            if out.shape[1] != channels + 1:
                raise ValueError(f"the gated EqM parameterisation needs {channels + 1} output channels (image + "
                                 f"gate), got {out.shape[1]}")
            image, gate = out[:, :channels], torch.sigmoid(out[:, channels:].float() + GATE_BIAS)
            return (k * (1 - gate) * (x_t - image)).to(torch.promote_types(x_t.dtype, out.dtype))  # as `denoiser`
        return (x_t - out) * k

    def target(self, x: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """f* = (noise - x) * c(gamma): points away from the data; descent moves towards it."""
        return (noise - x) * _per_sample(self.c(level), x)

    def to_x0(self, x_t: torch.Tensor, pred: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """x0_hat = x_gamma - f * (1 - gamma) / c(gamma); exact when f = f*."""
        return x_t - pred * _per_sample(self.step_to_data(level), x_t)

    def decoder_time(self, level: torch.Tensor) -> None:
        """EqM decoders get no time input: None."""

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared error ||f(x_gamma) - f*||^2 / (C*H*W): shape (B,), float32."""
        return _mse(pred, target)


# ----------------------------------------------------------------------------------------------------------------
# Flow matching (Lipman et al. 2023, Eq. 22-23; logit-normal t of Esser et al. 2024, SD3 Sec. 3.1), the SSDD baseline.


class FlowMatching:
    """Rectified-flow / flow matching with a time-conditioned decoder (SSDD).

    t = sigmoid(n), n ~ N(logit_mean, logit_std^2); x_t = (1 - t) * x + t * noise; target v = x - noise.
    """

    name = "fm"
    time_conditioned = True
    training_only = ("logit_mean", "logit_std")  # settings that only choose training levels

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0):
        """
        Args:
            logit_mean: mean of the logit-normal noise-level distribution (SSDD: 0).
            logit_std: standard deviation of the logit-normal distribution, > 0 (SSDD: 1).
        """
        if not logit_std > 0:
            raise ValueError(f"FlowMatching logit_std must be > 0, got {logit_std}")
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def __repr__(self) -> str:
        return f"FlowMatching(logit_mean={self.logit_mean}, logit_std={self.logit_std})"

    def sample_level(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """t = sigmoid(n), n ~ N(logit_mean, logit_std^2), one per sample: shape (B,), float32 in (0, 1)."""
        n = torch.randn(x.shape[0], generator=generator, device=x.device)
        return torch.sigmoid(self.logit_mean + self.logit_std * n)

    def corrupt(self, x: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) * x + t * noise."""
        t = _per_sample(level, x)
        return (1 - t) * x + t * noise

    def pred(self, x_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The network output is the velocity itself."""
        return out

    def target(self, x: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Velocity v = x - noise (= -dx_t/dt)."""
        return x - noise

    def to_x0(self, x_t: torch.Tensor, pred: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """x0_hat = x_t + t * v; exact when v = x - noise."""
        return x_t + _per_sample(level, x_t) * pred

    def decoder_time(self, level: torch.Tensor) -> torch.Tensor:
        """The decoder sees t itself, (B,) in [0, 1]."""
        return level

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared error ||v_hat - v||^2 / (C*H*W): shape (B,), float32."""
        return _mse(pred, target)
