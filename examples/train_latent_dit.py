"""Train a small DiT on dcssdae latents, sample latents from it and decode them through AutoencoderDCSSD.

The whole loop of latent diffusion on a dcssdae model, at CPU scale (docs/latent_diffusion.md has the GPU version):

    dcssdae export runs/quickstart/checkpoints/last.ckpt runs/quickstart/export
    dcssdae latents --model runs/quickstart/export --shards default --out runs/latents/photos --size 128 --flip
    python examples/train_latent_dit.py --model runs/quickstart/export --latents runs/latents/photos \\
        --out runs/latent_dit.png

The network is diffusers' `DiTTransformer2DModel` (Peebles & Xie 2023, adaLN-Zero blocks on patches of the latent),
class-conditional (the default photos have no class: all get class 0). It is trained with flow matching on the
straight path of SiT / rectified flow (Ma et al. 2024, Liu et al. 2023): z_t = (1 - t) z + t noise, t ~ U(0, 1),
the network predicts the velocity v = noise - z (loss ||v_hat - v||^2), and samples are drawn with diffusers'
`FlowMatchEulerDiscreteScheduler` (Euler steps from t = 1 to 0). Latents come from `LatentDataModule`: posterior
draws, mirrored half the time, scaled by the stats.json of `dcssdae latents`; the sampled latents are unscaled
(`dm.scaling.unscale`) and decoded by the autoencoder's own sampler.

The picture: top row, a few training latents (posterior means) decoded; below, the DiT's samples decoded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from torchvision.utils import save_image

from dcssdae.data import LatentDataModule
from dcssdae.diffusers_model import AutoencoderDCSSD


def build_dit(latent_shape: tuple[int, int, int], width: int, depth: int, heads: int, patch: int,
              classes: int) -> DiTTransformer2DModel:
    """A DiT for (C, h, w) latents: `depth` blocks of `width` channels, `heads` heads, `patch` x `patch` patches."""
    channels, h, w = latent_shape
    if h != w or h % patch:
        raise ValueError(f"DiTTransformer2DModel needs square latents divisible by the patch size, got {h} x {w} "
                         f"and patch {patch}")
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=channels,
                                 out_channels=channels, num_layers=depth, sample_size=h, patch_size=patch,
                                 num_embeds_ada_norm=classes)


def flow_matching_loss(dit: DiTTransformer2DModel, z: torch.Tensor, labels: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """||v_hat(z_t, t) - (noise - z)||^2 on z_t = (1 - t) z + t noise (SiT's linear path), t ~ U(0, 1)."""
    noise = torch.randn(z.shape, generator=generator)
    t = torch.rand(z.shape[0], generator=generator)
    z_t = (1 - t[:, None, None, None]) * z + t[:, None, None, None] * noise
    v_hat = dit(z_t, timestep=t * 1000, class_labels=labels).sample  # timesteps on the scheduler's 0..1000 scale
    return (v_hat - (noise - z)).square().mean()


@torch.no_grad()
def sample_latents(dit: DiTTransformer2DModel, labels: torch.Tensor, latent_shape: tuple[int, int, int],
                   steps: int, generator: torch.Generator) -> torch.Tensor:
    """Euler steps of the learned ODE from noise (t = 1) to latents (t = 0), with diffusers' scheduler."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    z = torch.randn((len(labels), *latent_shape), generator=generator)
    for timestep in scheduler.timesteps:
        v_hat = dit(z, timestep=timestep.expand(len(labels)), class_labels=labels).sample
        z = scheduler.step(v_hat, timestep, z).prev_sample
    return z


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the autoencoder: export folder or .ckpt")
    parser.add_argument("--latents", required=True, help="folder written by `dcssdae latents`")
    parser.add_argument("--out", default="runs/latent_dit.png", help="the PNG to write")
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--width", type=int, default=256, help="DiT hidden size (DiT-XL: 1152)")
    parser.add_argument("--depth", type=int, default=6, help="DiT blocks (DiT-XL: 28)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (DiT-XL: 16)")
    parser.add_argument("--patch", type=int, default=2, help="patch size on the latent grid")
    parser.add_argument("--samples", type=int, default=8, help="latents to sample and decode")
    parser.add_argument("--sample-steps", type=int, default=50, help="Euler steps of the DiT sampler")
    parser.add_argument("--decode-steps", type=int, default=None, help="decoder sampler steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="data loader workers")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    dm = LatentDataModule(args.latents, args.latents, batch_size=args.batch_size, num_workers=args.workers,
                          train_epoch_size=args.steps * args.batch_size, seed=args.seed, pin_memory=False)
    dm.setup("fit")
    classes = max(1, len(dm.classes or []))  # the default photos have none: one class, 0
    dit = build_dit(dm.latent_shape, args.width, args.depth, args.heads, args.patch, classes)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    dit.train()
    step, start, losses = 0, time.perf_counter(), []
    for batch in dm.train_dataloader():  # one epoch of `steps` batches (an endless stream of posterior draws)
        labels = batch["label"].clamp(min=0)  # unlabelled photos (-1): class 0
        loss = flow_matching_loss(dit, batch["latent"], labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step == args.steps:  # (the epoch is rounded up to a multiple of the workers)
            break
    train_seconds = time.perf_counter() - start

    dit.eval()
    z = sample_latents(dit, torch.arange(args.samples) % classes, dm.latent_shape, args.sample_steps, generator)
    references = torch.cat([b["latent"] for b in dm.val_dataloader()])
    references = references[torch.arange(args.samples) % len(references)]  # one row of them
    vae = AutoencoderDCSSD.from_pretrained(args.model).eval()
    with torch.no_grad():
        decode = {"generator": torch.Generator().manual_seed(args.seed), "steps": args.decode_steps}
        images = vae.decode(dm.scaling.unscale(torch.cat([references, z])), **decode).sample
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image((images.clamp(-1, 1) + 1) / 2, out, nrow=args.samples, padding=2, pad_value=1.0)
    summary = {"steps": step, "train_seconds": round(train_seconds, 1), "final_loss": sum(losses[-50:]) /
               len(losses[-50:]), "dit_parameters": sum(p.numel() for p in dit.parameters()),
               "latent_shape": list(dm.latent_shape), "picture": str(out), "args": vars(args)}
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}))
    return summary


if __name__ == "__main__":
    main()
