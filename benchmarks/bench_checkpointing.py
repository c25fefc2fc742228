"""Gradient checkpointing: training-step memory and time with and without it, in one process, as ratios.

The model is `AutoencoderDCSSD` as phase 1 trains it (configs/base.yaml): the `dc-ae-f32c32-in-1.0` encoder with a
Gaussian posterior, the SSDD U-ViT decoder (default S), Equilibrium Matching; random weights (memory and time do not
depend on them). One training step = encoder -> posterior sample -> EqM corruption -> decoder -> EqM MSE + 1e-6 KL
(as bench_networks.py's `train` part), forward and backward; no optimizer step (the same either way). Checkpointing is
switched with diffusers' `enable_gradient_checkpointing` / `disable_gradient_checkpointing`: every encoder block and
every decoder block (ResBlocks, transformer blocks) keeps only its input for backward and is recomputed there.

Reported per image side, off and on, and on/off ratios:
  * saved: bytes of the tensors autograd holds for backward at the end of the forward pass (parameters excluded,
    each storage once; torch.autograd.graph.saved_tensors_hooks): the activation memory, exact and device-free.
  * peak: peak working memory of the step above what was allocated before it (bench_networks.PeakMemory: CUDA
    allocator stats, or sampled RSS on the CPU with glibc serving allocations above 64 KiB by mmap); includes the
    gradients, the same both ways.
  * time: fastest of --iters interleaved rounds (bench_networks.time_interleaved).
  * grad_max_abs_diff: the largest difference between the two steps' gradients (0: the same gradients).

    python benchmarks/bench_checkpointing.py --threads 1 --json docs/bench/checkpointing_cpu.json   # CPU, 256 px
    python benchmarks/bench_checkpointing.py --device cuda --dtype bf16 --batch 4 --sizes 256 512
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import subprocess
import sys

import torch
from bench_networks import PeakMemory, set_malloc, time_interleaved  # benchmarks/ is on sys.path as a script

from dcssdae.atomic_files import write_json
from dcssdae.diffusers_model import AutoencoderDCSSD
from dcssdae.losses import LossWeights, kl_loss


def build(encoder: str, decoder: str, device: torch.device) -> AutoencoderDCSSD:
    torch.manual_seed(0)
    vae = AutoencoderDCSSD(encoder_preset=encoder, decoder_preset=decoder, encoder_overrides={"double_latent": True})
    return vae.to(device).train()


def loss_of(vae: AutoencoderDCSSD, x: torch.Tensor, seed: int) -> torch.Tensor:
    """EqM MSE + 1e-6 KL of one batch, its randomness drawn from `seed` (the same draws for both settings)."""
    ae, g = vae.ae, torch.Generator(x.device).manual_seed(seed)
    corruption = ae.corruption
    posterior = ae.encoder(x)
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g, device=x.device)
    noise = torch.randn(x.shape, generator=g, device=x.device)
    level = torch.rand(x.shape[0], generator=g, device=x.device)  # gamma ~ U[0, 1), as corruption.sample_level
    x_t = corruption.corrupt(x, noise, level)
    pred = corruption.pred(x_t, ae.decoder(x_t, z, corruption.decoder_time(level)))
    target = corruption.target(x, noise, level)
    terms = {corruption.name: corruption.loss(pred, target).mean(), "kl": kl_loss(posterior)}
    return LossWeights().total(terms)


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """fn()'s result and the bytes autograd saved for backward while it ran (parameters excluded, storages once)."""
    saved = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


def main(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = torch.autocast")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[256])
    p.add_argument("--encoder", default="dc-ae-f32c32-in-1.0")
    p.add_argument("--decoder", default="S")
    p.add_argument("--iters", type=int, default=None, help="timed rounds; default 1 on CPU, 5 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    iters = args.iters or (5 if device.type == "cuda" else 1)
    autocast = (lambda: torch.autocast(device.type, torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
    try:  # the code measured: read before the run
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    vae = build(args.encoder, args.decoder, device)

    def step(x: torch.Tensor, checkpointing: bool) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        (vae.enable_gradient_checkpointing if checkpointing else vae.disable_gradient_checkpointing)()
        vae.zero_grad(set_to_none=True)
        with autocast():
            loss, saved = saved_bytes(lambda: loss_of(vae, x, seed=1))
        loss.backward()
        return loss.detach(), saved, {n: q.grad for n, q in vae.named_parameters() if q.grad is not None}

    rows = []
    for side in args.sizes:
        x = torch.rand(args.batch, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
        row = {"side": side, "batch": args.batch}
        if device.type == "cpu":
            set_malloc("mmap")  # memory calls first: the RSS follows the live tensors
        grads = {}
        for setting in ("off", "on"):
            vae.zero_grad(set_to_none=True)  # the previous step's gradients freed before the baseline is read
            with PeakMemory(device) as memory:
                loss, saved, grads[setting] = step(x, setting == "on")
            row[setting] = {"saved": saved, "peak": memory.peak, "loss": loss.item()}
            grads[setting] = {n: g.detach().clone() for n, g in grads[setting].items()}
        row["grad_max_abs_diff"] = max((grads["on"][n] - grads["off"][n]).abs().max().item() for n in grads["off"])
        del grads
        vae.zero_grad(set_to_none=True)
        if device.type == "cpu":
            set_malloc("steady")
        times = time_interleaved([lambda x=x: step(x, False), lambda x=x: step(x, True)], iters, device)
        row["off"]["time"], row["on"]["time"] = times
        row["ratio"] = {k: row["on"][k] / row["off"][k] for k in ("saved", "peak", "time")}
        rows.append(row)
        print(f"{side} px, batch {args.batch}: activations saved {row['off']['saved'] / 2**20:.0f} -> "
              f"{row['on']['saved'] / 2**20:.0f} MiB (x{row['ratio']['saved']:.3f}), peak "
              f"{row['off']['peak'] / 2**20:.0f} -> {row['on']['peak'] / 2**20:.0f} MiB (x{row['ratio']['peak']:.3f}), "
              f"time {row['off']['time']:.2f} -> {row['on']['time']:.2f} s (x{row['ratio']['time']:.2f}), "
              f"gradients differ by at most {row['grad_max_abs_diff']:.3g}")
    result = {
        "settings": {**vars(args), "iters": iters, "torch": torch.__version__, "commit": commit,
                     "command": "python benchmarks/bench_checkpointing.py " + " ".join(sys.argv[1:] if argv is None
                                                                                       else argv),
                     "device_name": torch.cuda.get_device_name() if device.type == "cuda"
                     else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"},
        "rows": rows,
    }
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
