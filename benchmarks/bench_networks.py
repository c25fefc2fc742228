"""Network speed and memory: our encoder/decoder next to diffusers' DC-AE and SD-VAE, in one process.

Ours: the `dc-ae-f32c32-in-1.0` encoder (dcssdae.encoder) and the SSDD U-ViT decoder (default S, one decoder
evaluation = one NFE, EqM: no time input). References: diffusers `AutoencoderDC` with the dc-ae-f32c32-in-1.0
config, and `AutoencoderKL` with the SD-VAE f8c4 config (block_out_channels 128-256-512-512, 2 layers per
block, 4 latent channels). All weights are random (speed and memory do not depend on them).

Reported per model and resolution: images/s = batch / fastest call, the calls of all models being timed in
interleaved rounds (after warm-up) so that a machine load that drifts during the run hits every model alike;
ratios of images/s against the two references (>1: faster); and the peak working memory of one call, i.e. the
peak above what was allocated before the call (weights and inputs excluded):
  * CUDA: torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() before the call.
  * CPU: peak resident set size (/proc/self/statm, sampled every 0.5 ms by a thread) minus the RSS before the
    call, with glibc told to serve every allocation above 64 KiB by mmap (mallopt), so freed tensors go back
    to the OS and the RSS follows the live tensors. Approximate (sampling can miss a short peak).
The attention-bias size of the decoder's middle transformer (sdpa backend) is printed under the table.

    python benchmarks/bench_networks.py                                  # CPU, 256 px, batch 1, light
    python benchmarks/bench_networks.py --device cuda --dtype bf16 --batch 16 --sizes 256 512 --compile
"""

from __future__ import annotations

import argparse
import ctypes
import os
import threading
import time
from collections.abc import Callable

import torch

from dcssdae.decoder import build_decoder
from dcssdae.encoder import build_encoder

# ----------------------------------------------------------------------------------------------------
# Reference autoencoders (diffusers), configured as in /work/shared/notes/environment.md section 4.


def diffusers_dc_ae_f32c32():
    from diffusers import AutoencoderDC

    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    return AutoencoderDC(
        in_channels=3, latent_channels=32, attention_head_dim=32,
        encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        encoder_layers_per_block=(0, 4, 8, 2, 2, 2), decoder_layers_per_block=(0, 5, 10, 2, 2, 2),
        encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
        decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
        downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle", scaling_factor=0.3189,
    )  # fmt: skip


def diffusers_sd_vae_f8c4():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Measurement.


class PeakMemory:
    """Peak working memory (bytes) of the enclosed code: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.0005)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._max = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._base


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(calls: list[Callable[[], object]], iters: int, device: torch.device) -> list[float]:
    """Fastest wall time of each call over `iters` rounds that run every call once, in turn (robust to a load
    that drifts during the run, which sequential timing is not)."""
    best = [float("inf")] * len(calls)
    for _ in range(iters):
        for i, fn in enumerate(calls):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def print_attention_bias(decoder, sides: list[int], batch: int, dtype: torch.dtype, backend: str) -> None:
    """Size of the window bias of the middle transformer: (1, heads, N, N) per block, shared by the batch."""
    heads, depth, nbytes, mib = decoder.mid_heads, decoder.mid_depth, torch.finfo(dtype).bits // 8, 2**20
    print(f"\nattention bias of the decoder's middle transformer ({heads} heads, {depth} blocks, {dtype}); "
          f"the {backend} backend is in use, the flex backend stores no bias at all:")  # fmt: skip
    head = (f"{'px':>4} {'N':>6} {'per block MiB':>14} {'kept for backward, all blocks MiB':>34} "
            f"{'fp32 build copy MiB':>20} {f'dense (B*heads,N,N) mask at B={batch} MiB':>38}")  # fmt: skip
    print(head)
    for side in sides:
        n2 = ((side // 8) ** 2) ** 2
        print(f"{side:>4} {(side // 8) ** 2:>6} {heads * n2 * nbytes / mib:>14.0f} "
              f"{depth * heads * n2 * nbytes / mib:>34.0f} {heads * n2 * 4 / mib:>20.0f} "
              f"{batch * heads * n2 * nbytes / mib:>38.0f}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Main.


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = torch.autocast")
    p.add_argument("--batch", type=int, default=None, help="default 1 on CPU, 16 on CUDA")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="image sides; default 256 (CPU), 256 512"
    )
    p.add_argument("--iters", type=int, default=None, help="timed rounds; default 3 on CPU, 20 on CUDA")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed calls first; default 1 on CPU, 5 on CUDA"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every model call")
    p.add_argument("--encoder", default="dc-ae-f32c32-in-1.0")
    p.add_argument("--decoder", default="S")
    p.add_argument("--attention-backend", default="sdpa", choices=["sdpa", "flex"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    batch = args.batch or (1 if cpu else 16)
    sizes = args.sizes or ([256] if cpu else [256, 512])
    iters = args.iters or (3 if cpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    fp32 = dtype == torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu:  # every allocation above 64 KiB by mmap, so that the RSS follows live tensors
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD

    torch.manual_seed(0)
    encoder = build_encoder(args.encoder).eval().to(device)
    latent_channels = encoder.latent_channels
    decoder = build_decoder(args.decoder, latent_channels, attention_backend=args.attention_backend)
    decoder = decoder.eval().to(device)
    models = [
        ("ours", f"{args.encoder} + UViT-{args.decoder} (1 NFE)", encoder, decoder, encoder.downsample_factor)
    ]
    try:
        dc, kl = diffusers_dc_ae_f32c32().eval().to(device), diffusers_sd_vae_f8c4().eval().to(device)
        models += [
            ("dc-ae", "diffusers AutoencoderDC f32c32-in", dc.encoder, dc.decoder, 32),
            ("sd-vae", "diffusers AutoencoderKL f8c4", _KLEncode(kl), _KLDecode(kl), 8),
        ]
    except ImportError as err:
        print(f"diffusers is not installed ({err}): reference rows skipped")

    def count(m):
        return sum(p.numel() for p in m.parameters()) / 1e6

    entries = []  # (side, part, key, label, params M, call)
    for side in sizes:
        for key, label, enc, dec, f in models:
            c = {"ours": latent_channels, "dc-ae": 32, "sd-vae": 4}[key]
            x = torch.randn(batch, 3, side, side, device=device)
            z = torch.randn(batch, c, side // f, side // f, device=device)
            dec_fn = (lambda m=dec, x=x, z=z: m(x, z)) if key == "ours" else (lambda m=dec, z=z: m(z))
            for part, module, fn in (("encoder", enc, lambda m=enc, x=x: m(x)), ("decoder", dec, dec_fn)):
                run = torch.compile(fn) if args.compile else fn

                def call(run=run):
                    with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=not fp32):
                        return run()

                entries.append((side, part, key, label, count(module), call))
    rows = []
    for side, part, key, label, params, call in entries:
        for _ in range(warmup):
            call()
        with PeakMemory(device) as mem:  # one call, apart from the timing
            call()
        print(f"  warm {side} px {part:<8} {label}: {mem.peak / 2**20:.0f} MiB", flush=True)
        rows.append(_row(side, part, key, label, params, 0.0, mem.peak))
    for row, seconds in zip(rows, time_interleaved([e[-1] for e in entries], iters, device), strict=True):
        row["speed"] = batch / seconds
    for side in sizes:  # full autoencoder: encode + one decode
        for key in [m[0] for m in models]:
            e, d = (r for r in rows if (r["side"], r["key"]) == (side, key) and r["part"] != "enc+dec")
            speed, mem = 1 / (1 / e["speed"] + 1 / d["speed"]), max(e["mem"], d["mem"])
            rows.append(_row(side, "enc+dec", key, e["label"], e["params"] + d["params"], speed, mem))

    def ref(row, key, field):
        match = [r for r in rows if (r["side"], r["part"], r["key"]) == (row["side"], row["part"], key)]
        return row[field] / match[0][field] if match and match[0][field] else float("nan")

    where = f"{torch.get_num_threads()} threads" if cpu else torch.cuda.get_device_name()
    print(f"\ndevice {device} ({where}), {args.dtype}, batch {batch}, fastest of {iters} interleaved rounds "
          f"(+{warmup} warm-up), compile {args.compile}, torch {torch.__version__}; "
          f"memory = peak working memory of one call (see module docstring)\n")  # fmt: skip
    head = (f"{'px':>4} {'part':<8} {'model':<52} {'params M':>9} {'img/s':>9} {'x dc-ae':>8} "
            f"{'x sd-vae':>9} {'mem MiB':>9} {'mem/dc-ae':>9}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    order = {"encoder": 0, "decoder": 1, "enc+dec": 2, "ours": 0, "dc-ae": 1, "sd-vae": 2}
    for r in sorted(rows, key=lambda r: (r["side"], order[r["part"]], order[r["key"]])):
        print(f"{r['side']:>4} {r['part']:<8} {r['label']:<52} {r['params']:>9.2f} {r['speed']:>9.3f} "
              f"{ref(r, 'dc-ae', 'speed'):>8.2f} {ref(r, 'sd-vae', 'speed'):>9.2f} {r['mem'] / 2**20:>9.0f} "
              f"{ref(r, 'dc-ae', 'mem'):>9.2f}")  # fmt: skip
    print_attention_bias(decoder, sorted(set(sizes) | {256, 512}), batch, dtype, args.attention_backend)


def _row(side, part, key, label, params, speed, mem) -> dict:
    return {"side": side, "part": part, "key": key, "label": label,
            "params": params, "speed": speed, "mem": mem}  # fmt: skip


class _KLEncode(torch.nn.Module):
    """SD-VAE encode: encoder + quant_conv -> posterior parameters."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, x):
        return self.quant_conv(self.encoder(x))


class _KLDecode(torch.nn.Module):
    """SD-VAE decode: post_quant_conv + decoder."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


if __name__ == "__main__":
    main()
