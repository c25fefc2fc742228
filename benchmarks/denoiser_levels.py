"""How well a trained decoder denoises at fixed noise levels: its one-step estimate x0_hat(x_gamma) against the
image, beside the noisy input itself, on held-out images; and whether its sampler samples: the spread of decodes of
one latent over independent noise draws.

    python benchmarks/denoiser_levels.py runs/quickstart/checkpoints/last.ckpt --out runs/levels

For each level (EqM gamma, x_gamma = gamma x + (1 - gamma) noise; for flow matching t = 1 - gamma): MSE(x0_hat, x),
MSE(x_gamma, x) and, for EqM's gated parameterisation, the mean and 90th percentile of the gate s. A time-free
denoiser that cannot pass a nearly clean input through shows an error floor, MSE(x0_hat, x) above MSE(x_gamma, x) as
gamma -> 1, and the last steps of every sampling schedule evaluate it there.

Spread (`--steps`, `--draws`): each image is encoded once and decoded `draws` times with the model's sampler at each
step count (independent noise); the spread is the per-pixel standard deviation over the draws, averaged over pixels
and images, in units of the [0, 1] range. A decoder that samples p(x | z) has a spread of the order of what the
latent leaves undetermined; one that has collapsed onto a fixed point (a deterministic refinement, however good its
scores) has a spread near 0. Beside it: MSE(one draw, x) and MSE(mean of the draws, x), in [-1, 1] units like the
levels table. Images in [-1, 1]; the model's EMA weights for a `.ckpt`. Writes OUT.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dcssdae.atomic_files import write_json
from dcssdae.autoencoder import DCSSDAE
from dcssdae.data import ImageNetDataModule
from dcssdae.objectives import GATE_BIAS, EquilibriumMatching

GAMMAS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def levels(ae: DCSSDAE, x: torch.Tensor, noise: torch.Tensor, gammas: tuple[float, ...]) -> list[dict]:
    """One row per gamma: mse_x0_hat, mse_input and (gated EqM) gate_mean / gate_p90, over the batch x."""
    corruption = ae.corruption
    gated = isinstance(corruption, EquilibriumMatching) and corruption.parameterization == "gated"
    z = ae.raw_latent(ae.encode(x))
    rows = []
    for gamma in gammas:
        level = torch.full((len(x),), gamma if isinstance(corruption, EquilibriumMatching) else 1 - gamma)
        x_t = corruption.corrupt(x, noise, level)
        out = ae.network()(x_t, z, *([level] if corruption.time_conditioned else []))
        x0_hat = corruption.to_x0(x_t, corruption.pred(x_t, out), level)
        row = {"gamma": gamma, "mse_x0_hat": (x0_hat - x).square().mean().item(),
               "mse_input": (x_t - x).square().mean().item()}
        if gated:
            gate = torch.sigmoid(out[:, x.shape[1]:].float() + GATE_BIAS)
            row.update(gate_mean=gate.mean().item(), gate_p90=gate.flatten().quantile(0.9).item())
        rows.append(row)
    return rows


def spread(ae: DCSSDAE, x: torch.Tensor, steps: int, draws: int, seed: int = 0) -> dict:
    """Decode encode(x) `draws` times (noise seeds seed, seed + 1, ...) with `steps` sampler steps: spread (pixel
    std over the draws, [0, 1] units), mse_one_draw and mse_mean_of_draws (against x, [-1, 1] units)."""
    if draws < 2:
        raise ValueError(f"the spread needs at least 2 draws, got {draws}")
    z = ae.encode(x)
    x_hats = []
    for k in range(draws):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + k)).to(x.dtype)
        x_hats.append(ae.decode(z, noise=noise, **ae.sampler_settings(steps=steps)).float().clamp(-1, 1))
    x_hats = torch.stack(x_hats)
    x = x.float()
    return {"steps": steps, "draws": draws, "spread": (x_hats / 2).std(dim=0).mean().item(),
            "mse_one_draw": (x_hats[0] - x).square().mean().item(),
            "mse_mean_of_draws": (x_hats.mean(dim=0) - x).square().mean().item()}


def spread_markdown(rows: list[dict]) -> str:
    lines = ["| sampler steps | spread over draws | MSE(one draw, x) | MSE(mean of draws, x) |", "|---|---|---|---|"]
    lines += [f"| {r['steps']} | {r['spread']:.4f} | {r['mse_one_draw']:.4f} | {r['mse_mean_of_draws']:.4f} |"
              for r in rows]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    gated = "gate_mean" in rows[0]
    head = "| gamma | MSE(x0_hat, x) | MSE(x_gamma, x) |" + (" gate mean | gate p90 |" if gated else "")
    lines = [head, "|---" * (5 if gated else 3) + "|"]
    for r in rows:
        cells = [f"{r['gamma']:.2f}", f"{r['mse_x0_hat']:.4f}", f"{r['mse_input']:.4f}"]
        cells += [f"{r['gate_mean']:.3f}", f"{r['gate_p90']:.3f}"] if gated else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a .ckpt from `dcssdae fit` or an export folder")
    parser.add_argument("--val-shards", default="default", help="shards to score (default: the dev photos)")
    parser.add_argument("--size", type=int, default=256, help="image side (short side resized, centre crop)")
    parser.add_argument("--limit", type=int, default=6, help="images (the first ones of the shards)")
    parser.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS), help="levels, in [0, 1)")
    parser.add_argument("--steps", type=int, nargs="*", default=[1, 4, 16],
                        help="sampler step counts whose spread is measured (none: skip)")
    parser.add_argument("--draws", type=int, default=4, help="noise draws per image for the spread (>= 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--out", default=None, help="writes OUT.json")
    args = parser.parse_args(argv)
    if not all(0 <= g < 1 for g in args.gammas):
        parser.error(f"--gammas must lie in [0, 1), got {args.gammas}")
    if args.steps and (args.draws < 2 or min(args.steps) < 1):
        parser.error(f"--draws must be >= 2 and --steps >= 1, got {args.draws} and {args.steps}")

    ae = DCSSDAE.from_pretrained(args.model).eval()
    dm = ImageNetDataModule(val_shards=args.val_shards, train_shards="default", image_size=args.size,
                            val_batch_size=args.limit, num_workers=0)
    dm.setup("validate")
    x = next(iter(dm.val_dataloader()))["image"][: args.limit].to(ae.dtype)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(args.seed)).to(ae.dtype)
    with torch.no_grad():
        rows = levels(ae, x, noise, tuple(args.gammas))
        spreads = [spread(ae, x, steps, args.draws, seed=args.seed + 1) for steps in args.steps]
    print(markdown(rows))
    if spreads:
        print("\n" + spread_markdown(spreads))
    if args.out:
        write_json({"model": args.model, "val_shards": args.val_shards, "size": args.size, "images": len(x),
                    "seed": args.seed, "levels": rows, "spread": spreads}, Path(args.out).with_suffix(".json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
