"""Error against network evaluations (NFE) for the Equilibrium Matching samplers: fixed-step gradient descent,
Nesterov (standard and the EqM code's NAG-GD form) and adaptive stopping, under the constant and the noise step-size
schedules. First the spread of samples on the exact field of a Gaussian (closed form: does a sampler sample, or
return the posterior mean?), then two learnt fields:

* toy: a 2-D mixture of 4 Gaussians learnt by an MLP with the EqM loss; error = mean distance to the nearest mode.
* decoder: the `tiny` U-ViT decoder trained with the EqM loss to reconstruct 8 photos (32 x 32) from fixed random
  latents (a conditional field that is nearly a point mass per z); error = RMS against the photo, in [-1, 1] units.

For each adaptive threshold (and each Nesterov run) it prints the fixed-step GD NFE that reaches the same mean error
(log-linear interpolation along the GD curve) and the NFE saved. The DC-SSDAE write-up claims adaptive sampling
"potentially reduc[es] function evaluations by 60%".

    .venv/bin/python benchmarks/bench_samplers.py            # ~6 min on 2 shared CPU cores (1 thread)
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

from dcssdae.objectives import EquilibriumMatching
from dcssdae.sampling import sample

GD_STEPS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]  # the decoder sweep stops at 32


def schedules(eta):
    """(schedule, eta) pairs compared on the learnt fields."""
    return [("constant", eta), ("constant", eta / 4), ("noise", eta)]


THRESHOLDS = [0.3, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002]


# ----------------------------------------------------------------------------------------------------------------
# The two learnt fields.


def train_toy(steps: int, seed: int):
    """EqM on 4 Gaussians (std 0.1) at radius 1.5; returns (field, error_fn, noise)."""
    torch.manual_seed(seed)
    modes = torch.tensor([[1.5, 0.0], [0.0, 1.5], [-1.5, 0.0], [0.0, -1.5]])
    eqm = EquilibriumMatching()
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128), torch.nn.SiLU(),
        torch.nn.Linear(128, 128), torch.nn.SiLU(), torch.nn.Linear(128, 2),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        x = modes[torch.randint(4, (1024,))] + 0.1 * torch.randn(1024, 2)
        noise, gamma = torch.randn_like(x), eqm.sample_level(x)
        x_t = eqm.corrupt(x, noise, gamma)
        loss = eqm.loss(eqm.pred(x_t, net(x_t)), eqm.target(x, noise, gamma)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    net.requires_grad_(False)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(seed + 1))
    return (lambda x: eqm.pred(x, net(x))), (lambda x: torch.cdist(x, modes).min(dim=1).values), noise, ()


def _photos(size: int) -> torch.Tensor:
    """8 RGB photos bundled with scikit-image, centre-cropped and resized to size x size, in [-1, 1]."""
    import skimage.data

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
             "colorwheel"]
    images = []
    for name in names:
        image = torch.from_numpy(getattr(skimage.data, name)()[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1
        side = min(image.shape[1:])
        top, left = (image.shape[1] - side) // 2, (image.shape[2] - side) // 2
        image = image[:, top:top + side, left:left + side]
        images.append(F.interpolate(image[None], size=(size, size), mode="bicubic", antialias=True)[0].clamp(-1, 1))
    return torch.stack(images)


def train_decoder(steps: int, seed: int, size: int, samples_per_image: int = 4):
    """EqM-train the tiny decoder on 8 photos with fixed random latents; returns (field, error_fn, noise, context)."""
    from dcssdae.decoder import build_decoder

    torch.manual_seed(seed)
    images = _photos(size)                                     # (8, 3, size, size)
    z_all = torch.randn(8, 4, size // 8, size // 8)            # fixed latent per photo, f = 8
    decoder = build_decoder("tiny", latent_channels=4)
    eqm = EquilibriumMatching()
    opt = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        index = torch.randint(8, (16,))
        x, z = images[index], z_all[index]
        noise, gamma = torch.randn_like(x), eqm.sample_level(x)
        x_t = eqm.corrupt(x, noise, gamma)
        loss = eqm.loss(eqm.pred(x_t, decoder(x_t, z)), eqm.target(x, noise, gamma)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    decoder.eval().requires_grad_(False)
    index = torch.arange(8).repeat_interleave(samples_per_image)
    target, z = images[index], z_all[index]
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(seed + 1))

    def error(x):
        return (x - target).flatten(1).square().mean(1).sqrt()

    return (lambda x, z: eqm.pred(x, decoder(x, z))), error, noise, (z, target)


def gaussian_spread(eta: float, d: int = 3072, sigma: float = 0.3, samples: int = 16):
    """Spread of the samples on the exact EqM field (linear decay) of x ~ N(mu, sigma^2 I): a sampler must return
    sigma, the posterior mean returns ~0. Prints a table (method, schedule, steps -> NFE, mean error, spread)."""
    eqm = EquilibriumMatching()
    g = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(d, generator=gen, dtype=torch.float64) - 0.5
    noise = torch.randn(samples, d, generator=gen, dtype=torch.float64)
    v = g**2 * sigma**2 + (1 - g) ** 2
    a = g * sigma**2 / v

    def field(y):  # lambda * (y - E[x | y]), E over gamma | y in closed form per gamma
        sq = (y * y).sum(1, keepdim=True) - 2 * g * (y @ mu)[:, None] + g**2 * (mu @ mu)
        w = torch.softmax(-0.5 * d * torch.log(v) - sq / (2 * v), dim=1)
        return eqm.multiplier * ((w * (1 - a)).sum(1, keepdim=True) * y - (w * (1 - a * g)).sum(1, keepdim=True) * mu)

    print(f"\n## exact field of N(mu, {sigma}^2 I), d = {d}, {samples} samples: spread should be {sigma}\n")
    print("| method | schedule | steps | mean NFE | mean error | spread |\n|---|---|---|---|---|---|")
    rows = [("one_step", "-", 1, {})]
    rows += [("gd", "constant", n, {"steps": n, "schedule": "constant"}) for n in (8, 32)]
    rows += [("gd", "noise", n, {"steps": n}) for n in (4, 8, 16, 32)]
    rows += [("nesterov", "noise", n, {"steps": n}) for n in (8, 16)]
    rows += [("adaptive", "noise", 32, {"max_steps": 32, "threshold": t}) for t in (0.03, 0.01)]
    for method, schedule, n, settings in rows:
        step = {"eta": eta} if schedule in ("constant", "-") else {"step_to_data": eta}  # eta: the constant step
        x, nfe = sample(field, noise, method, **step, **settings)
        e = x - mu
        extra = f" (threshold {settings['threshold']})" if "threshold" in settings else ""
        print(f"| {method}{extra} | {schedule} | {n} | {nfe.double().mean():.1f} | "
              f"{e.mean(0).square().mean().sqrt():.3f} | {e.std():.3f} |")


# ----------------------------------------------------------------------------------------------------------------
# Sweeps and the equal-error comparison.


def sweep(field, error, noise, context, eta, max_steps, schedule="constant"):
    """Mean error and mean NFE of each sampler setting: {name: [(nfe, error), ...]}."""
    ctx = context[:1]  # the latent z (the decoder's context); the photo in context[1] is for the error only
    s = EquilibriumMatching().step_to_data  # the schedule's s(gamma); under "constant" it only sets adaptive's x0_hat
    kw = {"schedule": schedule, "step_to_data": s, **({"eta": eta} if schedule == "constant" else {})}
    runs = {"gd": [], "nesterov": [], "nag-gd (EqM form)": [], "adaptive": []}
    for steps in [n for n in GD_STEPS if n <= max_steps]:
        runs["gd"].append((steps, error(sample(field, noise, "gd", context=ctx, steps=steps, **kw)[0]).mean()))
        for name, form in (("nesterov", "standard"), ("nag-gd (EqM form)", "eqm")):
            x, _ = sample(field, noise, "nesterov", context=ctx, steps=steps, mu=0.3, form=form, **kw)
            runs[name].append((steps, error(x).mean()))
    for threshold in THRESHOLDS:
        x, nfe = sample(field, noise, "adaptive", context=ctx, threshold=threshold, max_steps=max_steps, **kw)
        runs["adaptive"].append((nfe.float().mean().item(), error(x).mean(), threshold))
    return {k: [(n, float(e), *rest) for n, e, *rest in v] for k, v in runs.items()}


def gd_nfe_for(error: float, gd: list[tuple[int, float]]) -> float:
    """Fewest GD evaluations reaching `error`, interpolating log(error) linearly between grid steps."""
    best = math.inf
    for (n0, e0), (n1, e1) in zip([(0, math.inf)] + gd[:-1], gd):
        if e1 <= error:
            if e0 == math.inf or e0 <= e1:
                return float(n1)
            frac = (math.log(e0) - math.log(error)) / (math.log(e0) - math.log(e1))
            return n0 + frac * (n1 - n0)
    return best


def report(title: str, runs: dict, eta: float, schedule: str = "constant"):
    gd = [(n, e) for n, e in runs["gd"]]
    # GD is not monotone once it sits at the model's fixed point; use its running minimum for "reaches".
    running, gd_reach = math.inf, []
    for n, e in gd:
        running = min(running, e)
        gd_reach.append((n, running))
    print(f"\n## {title} (schedule {schedule}, eta = {eta:g})\n")
    print("| sampler | setting | mean NFE | mean error | GD NFE at equal error | NFE saved |")
    print("|---|---|---|---|---|---|")
    for n, e in gd:
        print(f"| gd | steps={n} | {n} | {e:.4f} | | |")
    for name in ("nesterov", "nag-gd (EqM form)"):
        for n, e in runs[name]:
            equal = gd_nfe_for(e, gd_reach)
            saved = f"{1 - n / equal:+.0%}" if math.isfinite(equal) else "GD never reaches it"
            print(f"| {name} | steps={n}, mu=0.3 | {n} | {e:.4f} | {equal:.1f} | {saved} |")
    best = {}
    for n, e, threshold in runs["adaptive"]:
        equal = gd_nfe_for(e, gd_reach)
        saved = f"{1 - n / equal:+.0%}" if math.isfinite(equal) else "GD never reaches it"
        print(f"| adaptive | threshold={threshold:g} | {n:.2f} | {e:.4f} | {equal:.1f} | {saved} |")
        if math.isfinite(equal) and 1 - n / equal > best.get("saved", -math.inf):
            best = {"saved": 1 - n / equal, "threshold": threshold, "error": e}
    if best:
        print(f"\nadaptive: at most {best['saved']:.0%} fewer NFE than fixed-step GD at equal mean error "
              f"(threshold {best['threshold']:g}, error {best['error']:.4f}); GD's lowest error "
              f"{min(e for _, e in gd):.4f} at {min(gd, key=lambda r: r[1])[0]} steps")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy-steps", type=int, default=2000, help="MLP training iterations")
    parser.add_argument("--decoder-steps", type=int, default=600, help="tiny-decoder training iterations (batch 16)")
    parser.add_argument("--decoder-size", type=int, default=32, help="photo side (a multiple of 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these sizes)")
    parser.add_argument("--skip-decoder", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    eta = EquilibriumMatching().step_to_data(0.0).item()  # 1 / lambda = 0.5: exact in one step for a point mass

    gaussian_spread(eta)
    start = time.perf_counter()
    field, error, noise, context = train_toy(args.toy_steps, args.seed)
    trained = time.perf_counter()
    with torch.no_grad():
        for schedule, step in schedules(eta):
            report("2-D mixture of 4 Gaussians, MLP, mean distance to nearest mode", sweep(field, error, noise,
                   context, step, 64, schedule), step, schedule)
    print(f"\n(toy: training {trained - start:.0f} s, sampling {time.perf_counter() - trained:.0f} s)")

    if args.skip_decoder:
        return
    start = time.perf_counter()
    field, error, noise, context = train_decoder(args.decoder_steps, args.seed, args.decoder_size)
    trained = time.perf_counter()
    with torch.no_grad():
        for schedule, step in schedules(eta):
            report(f"tiny decoder, 8 photos {args.decoder_size}px, RMS error against the photo",
                   sweep(field, error, noise, context, step, 32, schedule), step, schedule)
    print(f"\n(decoder: training {trained - start:.0f} s, sampling {time.perf_counter() - trained:.0f} s)")


if __name__ == "__main__":
    main()
