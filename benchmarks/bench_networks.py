"""Autoencoder speed and memory: DC-SSDAE next to diffusers' DC-AE and SD-VAE, in one process, as ratios.

Ours: DC-SSDAE as phase 1 trains it (configs/base.yaml): the `dc-ae-f32c32-in-1.0` encoder with a Gaussian
posterior (`double_latent`), the SSDD U-ViT decoder (default S) and Equilibrium Matching (linear decay).
References: diffusers `AutoencoderDC` with the dc-ae-f32c32-in-1.0 config, and `AutoencoderKL` with the SD-VAE
f8c4 config (block_out_channels 128-256-512-512, 2 layers per block, 4 latent channels). All weights are random
(speed and memory do not depend on them).

Parts (`--parts`), per model and image side:
  * encoder: image -> latent (ours and SD-VAE: the posterior mean).
  * decoder: latent -> image. Ours runs the real sampler (`dcssdae.sampling.sample`, EqM gradient descent with
    eta = 1 / c(0), the decoding path of `DCSSDAE.decode`) for each N of `--steps`: one row per N, N decoder
    evaluations (NFE). The references decode in one call; every N-NFE row is compared with that call.
    `enc+dec` rows combine the two (1 / images/s added).
  * train: one training step of the whole autoencoder in train mode: forward, backward and an AdamW step (lr 1e-4,
    weight decay 1e-3, as configs/base.yaml), under autocast with --dtype bf16. Ours: encoder -> posterior sample
    -> EqM corruption (gamma ~ U[0, 1), x_gamma, target f*) -> decoder -> EqM MSE + 1e-6 KL (dcssdae.losses
    weights). DC-AE: encode -> decode, MSE reconstruction. SD-VAE: encode -> posterior sample -> decode, MSE +
    1e-6 KL. Frozen perceptual nets are left out of all three: LPIPS and the REPA DINOv2 need pretrained weights,
    and a frozen net adds the same cost to every model (it would only pull the ratios towards 1); the
    autoencoders' own GAN/perceptual terms differ per recipe and are not compared here.
With --compile, each model's networks (encoder, decoder) are compiled with torch.compile(dynamic=False); the
sampler loop, the losses and the optimiser step stay eager. A network that fails to compile is reported and runs
eagerly from then on (the row's `compiled` field says which way it was timed).

Reported: images/s = batch / fastest call, the calls of all models being timed in interleaved rounds (after
warm-up) so that a machine load that drifts during the run hits every model alike (inference and training rounds
are separate passes, models in eval and in train mode); ratios against the two references (>1: faster, or more
memory); and the peak working memory of one call, i.e. the peak above what was allocated before the call
(weights, AdamW moments and inputs excluded; gradients included, they are freed after each step):
  * CUDA: torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() before the call.
  * CPU: peak resident set size (/proc/self/statm, sampled every 0.5 ms by a thread) minus the RSS before the
    call, with glibc told to serve every allocation above 64 KiB by mmap (mallopt; every memory call runs before
    any timed one), so freed tensors go back to the OS and the RSS follows the live tensors. Approximate
    (sampling can miss a short peak).
CPU timing (`--malloc`): "steady" (default) times the calls with glibc's thresholds at the values its dynamic
adjustment settles at in any long-running process (mmap only above 32 MiB, heap trimmed above 64 MiB), so a freed
tensor's pages are reused; "mmap" times them as the memory call runs (every allocation above 64 KiB a fresh
mmap, its pages faulted in and zeroed on every call), which charges each model for the bytes it allocates.
FLOPs per image: one extra call per row under torch.utils.flop_counter.FlopCounterMode, on the eager networks
(convolutions, matmuls and attention; forward, and backward for the training step; elementwise work and
normalisation are not counted), divided by the batch; `--no-flops` skips it. GFLOP/img next to img/s shows how
much of each model's arithmetic turns into speed.
A call that runs out of GPU memory is reported as OOM and dropped. `--json PATH` writes every row (and the
settings) as JSON, atomically: speed in images/s, mem in bytes, flops per image, params_m in millions,
speed_x_<ref> and mem_x_<ref> the ratios (null where a reference is missing), loss the training loss of the
memory call. The size that the dense attention bias of the decoder's middle transformer would take (the
reference `sdpa` backend; the default backend builds none) is printed last.

    python benchmarks/bench_networks.py --threads 1                      # CPU, 256 px, batch 1 (~3.5 min)
    python benchmarks/bench_networks.py --device cuda --dtype bf16 --batch 16 --sizes 256 512 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from dcssdae.atomic_files import write_json
from dcssdae.autoencoder import DCSSDAE
from dcssdae.encoders import Posterior
from dcssdae.losses import LossWeights, kl_loss
from dcssdae.sampling import sample

REFERENCES = ("dc-ae", "sd-vae")
PARTS = ("encoder", "decoder", "train")

# ----------------------------------------------------------------------------------------------------
# Reference autoencoders (diffusers), configured as diffusers and DC-AE publish them; `tiny`
# shrinks them for tests only.


def diffusers_dc_ae_f32c32(tiny: bool = False):
    from diffusers import AutoencoderDC

    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    widths = (16, 16, 32, 32, 32, 32) if tiny else (128, 256, 512, 512, 1024, 1024)
    return AutoencoderDC(
        in_channels=3, latent_channels=8 if tiny else 32, attention_head_dim=8 if tiny else 32,
        encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=widths, decoder_block_out_channels=widths,
        encoder_layers_per_block=(0, 1, 1, 1, 1, 1) if tiny else (0, 4, 8, 2, 2, 2),
        decoder_layers_per_block=(0, 1, 1, 1, 1, 1) if tiny else (0, 5, 10, 2, 2, 2),
        encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
        decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
        downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle", scaling_factor=0.3189,
    )  # fmt: skip


def diffusers_sd_vae_f8c4(tiny: bool = False):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1 if tiny else 2,
        norm_num_groups=8 if tiny else 32, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32) if tiny else (128, 256, 512, 512),
    )  # fmt: skip


class _KLEncode(torch.nn.Module):
    """SD-VAE encode: encoder + quant_conv -> posterior parameters (mean, logvar) stacked on channels."""

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


class _Moments(torch.nn.Module):
    """Our encoder returning plain tensors (mean, logvar), so that torch.compile sees no Posterior object."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        posterior = self.encoder(x)
        return posterior.mean, posterior.logvar


# ----------------------------------------------------------------------------------------------------
# The three autoencoders behind one interface: encode, decode with N evaluations, training loss. `enc` and
# `dec` are the networks the calls go through: eager, or compiled by `compile()`.


class Benchmarked:
    key: str
    label: str

    def __init__(
        self, net: torch.nn.Module, enc: torch.nn.Module, dec: torch.nn.Module, factor: int, channels: int
    ):
        self.net, self.factor, self.channels = net, factor, channels  # net: every weight of the autoencoder
        self.eager = (enc, dec)
        self.enc, self.dec = enc, dec
        self.compiled = False
        self.weights = LossWeights()

    def compile(self) -> None:
        self.enc, self.dec = (torch.compile(m, dynamic=False) for m in self.eager)
        self.compiled = True

    def uncompile(self) -> None:
        self.enc, self.dec = self.eager
        self.compiled = False

    def params(self, part: str) -> float:
        """Parameters (millions) of the networks a part runs."""
        modules = {"encoder": [self.eager[0]], "decoder": [self.eager[1]], "train": list(self.eager)}[part]
        return sum(p.numel() for m in modules for p in m.parameters()) / 1e6


class Ours(Benchmarked):
    key = "ours"

    def __init__(self, encoder: str, decoder: str, attention_backend: str):
        self.ae = DCSSDAE(encoder, decoder, encoder_overrides={"double_latent": True},
                          decoder_overrides={"attention_backend": attention_backend})  # fmt: skip
        self.label = f"DC-SSDAE {encoder} + UViT-{decoder}"
        super().__init__(self.ae, _Moments(self.ae.encoder), self.ae.decoder, self.ae.downsample_factor,
                         self.ae.latent_channels)  # fmt: skip

    def encode(self, x):
        z = Posterior(*self.enc(x)).mode()
        return (z - self.ae.latent_shift) * self.ae.latent_scale  # as DCSSDAE.encode

    def decode(self, z, noise, nfe):
        z = self.ae.raw_latent(z)
        settings = self.ae.sampler_settings(steps=nfe, method="gd")  # the noise schedule, as DCSSDAE.sample
        fn = lambda x, z: self.ae.corruption.pred(x, self.dec(x, z))  # as DCSSDAE.pred
        return sample(fn, noise, settings.pop("method"), context=(z,), step_to_data=self.ae.corruption.step_to_data,
                      **settings)[0]

    def loss(self, x):
        corruption = self.ae.corruption  # EqM, as dcssdae.system.DCSSDAESystem.training_step uses it
        posterior = Posterior(*self.enc(x))  # q(z | x)
        z = posterior.sample()
        noise = torch.randn_like(x)
        level = corruption.sample_level(x)  # gamma ~ U[0, 1)
        x_t = corruption.corrupt(x, noise, level)
        pred = corruption.pred(x_t, self.dec(x_t, z, corruption.decoder_time(level)))
        target = corruption.target(x, noise, level)
        return self.weights.total(
            {corruption.name: corruption.loss(pred, target).mean(), "kl": kl_loss(posterior)}
        )


class DCAE(Benchmarked):
    key = "dc-ae"

    def __init__(self, tiny: bool):
        vae = diffusers_dc_ae_f32c32(tiny)
        self.label = "diffusers AutoencoderDC f32c32-in" + (" (tiny)" if tiny else "")
        super().__init__(vae, vae.encoder, vae.decoder, 32, vae.config.latent_channels)

    def encode(self, x):
        return self.enc(x)

    def decode(self, z, noise, nfe):
        return self.dec(z)

    def loss(self, x):
        return F.mse_loss(self.dec(self.enc(x)).float(), x)


class SDVAE(Benchmarked):
    key = "sd-vae"

    def __init__(self, tiny: bool):
        vae = diffusers_sd_vae_f8c4(tiny)
        self.label = "diffusers AutoencoderKL f8c4" + (" (tiny)" if tiny else "")
        super().__init__(vae, _KLEncode(vae), _KLDecode(vae), 8, 4)

    def encode(self, x):
        return Posterior(*self.enc(x).chunk(2, dim=1)).mode()

    def decode(self, z, noise, nfe):
        return self.dec(z)

    def loss(self, x):
        posterior = Posterior(*self.enc(x).chunk(2, dim=1))
        x_hat = self.dec(posterior.sample())
        return F.mse_loss(x_hat.float(), x) + self.weights.kl * kl_loss(posterior)


# ----------------------------------------------------------------------------------------------------
# Measurement.


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MALLOC = {"mmap": (64 * 2**10, 128 * 2**10), "steady": (32 * 2**20, 64 * 2**20)}  # (mmap, trim) thresholds


def set_malloc(mode: str) -> None:
    """glibc allocation thresholds (CPU): "mmap" for the memory calls, "mmap" or "steady" for the timed ones."""
    libc = ctypes.CDLL("libc.so.6")
    mmap_threshold, trim_threshold = MALLOC[mode]
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)


class PeakMemory:
    """Peak working memory (bytes) of the enclosed code: CUDA allocator stats, or sampled RSS on CPU (glibc set to
    "mmap" by the caller, so that the RSS follows the live tensors)."""

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


@dataclass
class Entry:
    """One timed call: a model's part at one image side (nfe: decoder evaluations of ours, else None)."""

    side: int
    part: str
    nfe: int | None
    model: Benchmarked
    call: Callable[[], object]
    row: dict = field(default_factory=dict)


def inference_call(model: Benchmarked, part: str, nfe: int | None, x, z, noise, autocast) -> Callable:
    def call():
        with torch.inference_mode(), autocast():
            return model.encode(x) if part == "encoder" else model.decode(z, noise, nfe)

    return call


def train_call(model: Benchmarked, optimizer: torch.optim.Optimizer, x, autocast) -> Callable:
    """forward + backward + AdamW step; gradients are freed after the step (set_to_none), so that the memory
    before the next call holds weights and AdamW moments only."""

    def call():
        with autocast():
            loss = model.loss(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return call


def make_optimizer(model: Benchmarked) -> torch.optim.Optimizer:
    """AdamW of configs/base.yaml, its moments allocated now (one step with zero gradients leaves the weights
    as they are but for the decay lr * wd), so that no measured call pays for their allocation."""
    params = [p for p in model.net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-3, betas=(0.9, 0.999))
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def first_calls(entry: Entry, warmup: int, device: torch.device) -> tuple[object, int] | None:
    """Warm-up calls, then one call under PeakMemory. A compiled model that fails here goes eager (with a printed
    message) and is measured again; out of memory returns None."""
    for attempt in range(2):
        try:
            for _ in range(warmup):
                entry.call()
            with PeakMemory(device) as mem:
                out = entry.call()
            return out, mem.peak
        except Exception as err:  # any compiler error falls back to eager; OOM is reported
            if _is_oom(err):
                print(f"  OOM: {entry.side} px {entry.part} {entry.model.label}")
                return None
            if not entry.model.compiled or attempt:
                raise
            print(f"  torch.compile failed for {entry.model.label} ({entry.side} px {entry.part}): "
                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; running it eagerly")  # fmt: skip
            entry.model.uncompile()
        finally:
            for p in entry.model.net.parameters():  # a failed training step leaves gradients behind
                p.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return None


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # FlopCounterMode passes shapes


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# The CPU kernel of F.scaled_dot_product_attention, which FlopCounterMode does not know (its CUDA kernels it does):
# counted with torch's own attention formulas, for every model alike (our window attention, SD-VAE's mid block).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def count_flops(entry: Entry) -> int | None:
    """FLOPs of one call (torch.utils.flop_counter: matmuls, convolutions and attention, forward and backward),
    counted on the eager networks (a compiled graph hides its operators from the counter); None if it fails."""
    model = entry.model
    networks = model.enc, model.dec
    model.enc, model.dec = model.eager
    try:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            entry.call()
        return counter.get_total_flops()
    except Exception as err:  # noqa: BLE001 (e.g. out of memory: the timed calls report it)
        print(f"  FLOPs not counted for {entry.model.label} ({entry.side} px {entry.part}): {type(err).__name__}")
        return None
    finally:
        model.enc, model.dec = networks
        for p in model.net.parameters():
            p.grad = None


def prepare(entries: list[Entry], warmup: int, batch: int, device: torch.device, flops: bool = True) -> list[Entry]:
    """Fill each entry's FLOPs per image (one counted call) and memory (one call after warm-up); returns the entries
    that ran (not out of memory), to be timed."""
    kept = []
    for e in entries:
        if flops:
            total = count_flops(e)
            e.row["flops"] = None if total is None else total / batch
        result = first_calls(e, warmup, device)
        nfe = f" {e.nfe} NFE" if e.nfe else ""
        if result is None:
            e.row.update(speed=None, mem=None, error="OOM")
            continue
        out, peak = result
        e.row.update(mem=peak, error=None)
        if e.part == "train":
            e.row["loss"] = float(out)
        print(f"  warm {e.side} px {e.part}{nfe} {e.model.label}: {peak / 2**20:.0f} MiB", flush=True)
        kept.append(e)
    return kept


def time_rows(entries: list[Entry], iters: int, batch: int, device: torch.device) -> None:
    """images/s of each entry's fastest call over `iters` interleaved rounds."""
    for e, seconds in zip(entries, time_interleaved([e.call for e in entries], iters, device), strict=True):
        e.row.update(speed=batch / seconds, compiled=e.model.compiled)


# ----------------------------------------------------------------------------------------------------
# Report: table, ratios, JSON.


def _row(side, part, nfe, model: Benchmarked | None, key, label, params) -> dict:
    return {"side": side, "part": part, "nfe": nfe, "key": key, "label": label, "params_m": params,
            "flops": None, "speed": None, "mem": None, "compiled": bool(model and model.compiled),
            "error": None}  # fmt: skip


def add_ratios(rows: list[dict]) -> None:
    """speed_x_<ref> = images/s / the reference's (>1: faster), mem_x_<ref> = memory / the reference's, for the
    same side and part (a reference decodes in one call: every N-NFE row of ours compares with it)."""
    for r in rows:
        for ref in REFERENCES:
            match = [m for m in rows if (m["side"], m["part"], m["key"]) == (r["side"], r["part"], ref)]
            for fld in ("speed", "mem"):
                mine, theirs = r[fld], match[0][fld] if match else None
                ok = mine is not None and theirs  # None, or 0 bytes (CPU RSS of a tiny model)
                r[f"{fld}_x_{ref.replace('-', '_')}"] = mine / theirs if ok else None


def combined_rows(rows: list[dict], sides: list[int], keys: list[str]) -> list[dict]:
    """enc+dec = encode then decode (1 / images/s added, memory the larger), per NFE of ours."""
    out = []
    for side in sides:
        for key in keys:
            enc = [r for r in rows if (r["side"], r["key"], r["part"]) == (side, key, "encoder")]
            for dec in [r for r in rows if (r["side"], r["key"], r["part"]) == (side, key, "decoder")]:
                if not enc:
                    continue
                e = enc[0]
                row = _row(
                    side, "enc+dec", dec["nfe"], None, key, e["label"], e["params_m"] + dec["params_m"]
                )
                if e["flops"] is not None and dec["flops"] is not None:
                    row["flops"] = e["flops"] + dec["flops"]
                if e["speed"] and dec["speed"]:
                    row.update(speed=1 / (1 / e["speed"] + 1 / dec["speed"]), mem=max(e["mem"], dec["mem"]))
                else:
                    row["error"] = e["error"] or dec["error"]
                row["compiled"] = e["compiled"] and dec["compiled"]
                out.append(row)
    return out


def _fmt(v, spec: str, width: int) -> str:
    return (
        f"{'-':>{width}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>{width}{spec}}"
    )


def print_table(rows: list[dict]) -> None:
    head = (f"{'px':>4} {'part':<16} {'model':<56} {'params M':>9} {'GFLOP/img':>10} {'img/s':>9} {'x dc-ae':>8} "
            f"{'x sd-vae':>9} {'mem MiB':>9} {'mem/dc-ae':>9} {'mem/sd-vae':>10}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for r in rows:
        part = r["part"] + (f" {r['nfe']} NFE" if r["nfe"] else "")
        mib = None if r["mem"] is None else r["mem"] / 2**20
        speed = r["error"] if r["speed"] is None and r["error"] else _fmt(r["speed"], ".3f", 9)
        gflops = None if r["flops"] is None else r["flops"] / 1e9
        print(f"{r['side']:>4} {part:<16} {r['label']:<56} {r['params_m']:>9.2f} {_fmt(gflops, '.1f', 10)} {speed:>9} "
              f"{_fmt(r['speed_x_dc_ae'], '.2f', 8)} {_fmt(r['speed_x_sd_vae'], '.2f', 9)} {_fmt(mib, '.0f', 9)} "
              f"{_fmt(r['mem_x_dc_ae'], '.2f', 9)} {_fmt(r['mem_x_sd_vae'], '.2f', 10)}")  # fmt: skip


def print_attention_bias(decoder, sides: list[int], batch: int, dtype: torch.dtype, backend: str) -> None:
    """Size of the window bias of the middle transformer: (1, heads, N, N) per block, shared by the batch."""
    heads, depth, nbytes, mib = decoder.mid_heads, decoder.mid_depth, torch.finfo(dtype).bits // 8, 2**20
    print(f"\ndense attention bias of the decoder's middle transformer ({heads} heads, {depth} blocks, {dtype}) with "
          f"the sdpa backend; the {backend} backend is in use (blocked and flex build no N x N bias):")  # fmt: skip
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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = torch.autocast")
    p.add_argument("--batch", type=_positive, default=None, help="default 1 on CPU, 16 on CUDA")
    p.add_argument(
        "--sizes", type=_positive, nargs="+", default=None, help="image sides; default 256 (CPU), 256 512"
    )
    p.add_argument(
        "--steps", type=_positive, nargs="+", default=[1, 8], help="NFE of our decoder rows (EqM GD)"
    )
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure")
    p.add_argument("--references", default="full", choices=["full", "tiny", "none"],
                   help="diffusers reference models; tiny: small configs, for tests only")  # fmt: skip
    p.add_argument("--iters", type=_positive, default=None, help="timed rounds; default 1 on CPU, 10 on CUDA")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before the memory call; default 0 on CPU (1 with --compile), 3 on CUDA")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile every model's encoder and decoder")
    p.add_argument("--encoder", default="dc-ae-f32c32-in-1.0")
    p.add_argument("--decoder", default="S")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "blocked", "flex"])
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--malloc", default="steady", choices=list(MALLOC),
                   help="CPU: glibc thresholds during the timed calls (see the module docstring)")  # fmt: skip
    p.add_argument("--no-flops", dest="flops", action="store_false",
                   help="skip the FLOP count (one more eager call per row)")  # fmt: skip
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: no CUDA device is available")
    cpu = args.device == "cpu"
    args.batch = args.batch or (1 if cpu else 16)
    args.sizes = args.sizes or ([256] if cpu else [256, 512])
    args.iters = args.iters or (1 if cpu else 10)
    if args.warmup is None:
        args.warmup = (1 if args.compile else 0) if cpu else 3
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    args.steps = sorted(set(args.steps))
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns {"settings": ..., "rows": [...]} (what --json writes)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu:  # memory calls: every allocation above 64 KiB by mmap, so that the RSS follows live tensors
        set_malloc("mmap")
    if args.compile:  # one graph per (side, part, grad mode): more than dynamo's default of 8 per function
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)

    def autocast():
        return torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()

    torch.manual_seed(0)
    models: list[Benchmarked] = [Ours(args.encoder, args.decoder, args.attention_backend)]
    if args.references != "none":
        try:
            models += [DCAE(args.references == "tiny"), SDVAE(args.references == "tiny")]
        except ImportError as err:
            print(f"diffusers is not installed ({err}): reference rows skipped")
    for m in models:
        m.net.to(device).eval()
        if args.compile:
            m.compile()
    optimizers = {m.key: make_optimizer(m) for m in models} if "train" in args.parts else {}

    inference, training = [], []
    for side in args.sizes:
        x = torch.rand(args.batch, 3, side, side, device=device) * 2 - 1  # images in [-1, 1]
        noise = torch.randn_like(x)
        for m in models:
            if side % m.factor:
                raise ValueError(
                    f"image side {side} is not a multiple of {m.label}'s downsampling factor {m.factor}"
                )
            z = torch.randn(args.batch, m.channels, side // m.factor, side // m.factor, device=device)
            if "encoder" in args.parts:
                inference.append(Entry(side, "encoder", None, m, inference_call(m, "encoder", None, x, z, noise,
                                                                                 autocast)))  # fmt: skip
            if "decoder" in args.parts:
                for nfe in args.steps if m.key == "ours" else [None]:
                    inference.append(Entry(side, "decoder", nfe, m, inference_call(m, "decoder", nfe, x, z, noise,
                                                                                     autocast)))  # fmt: skip
            if "train" in args.parts:
                training.append(Entry(side, "train", None, m, train_call(m, optimizers[m.key], x, autocast)))
    for e in inference + training:
        e.row = _row(e.side, e.part, e.nfe, e.model, e.model.key, e.model.label, e.model.params(e.part))

    # every memory call first (CPU: glibc in "mmap" mode throughout, so that no heap kept by a timed call inflates
    # an RSS peak), then the timed rounds (CPU: glibc as --malloc says)
    groups = ((inference, False), (training, True))  # (entries, train mode)
    kept = []
    for entries, train in groups:
        for m in models:
            m.net.train(train)
        kept.append(prepare(entries, args.warmup, args.batch, device, args.flops))
    if cpu:
        set_malloc(args.malloc)
    for (entries, train), ready in zip(groups, kept, strict=True):
        for m in models:
            m.net.train(train)
        time_rows(ready, args.iters, args.batch, device)
    for m in models:
        m.net.eval()

    rows = [e.row for e in inference + training]
    rows += combined_rows(rows, args.sizes, [m.key for m in models])
    order = {"encoder": 0, "decoder": 1, "enc+dec": 2, "train": 3, "ours": 0, "dc-ae": 1, "sd-vae": 2}
    rows.sort(key=lambda r: (r["side"], order[r["part"]], order[r["key"]], r["nfe"] or 0))
    add_ratios(rows)

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    where = f"{torch.get_num_threads()} threads" if cpu else torch.cuda.get_device_name()
    meta = {**{k: v for k, v in vars(args).items() if k != "json"}, "device_name": where,
            "torch": torch.__version__, "diffusers": diffusers_version,
            "compiled": {m.key: m.compiled for m in models}}  # fmt: skip
    print(f"\ndevice {device} ({where}), {args.dtype}, batch {args.batch}, fastest of {args.iters} interleaved "
          f"rounds (+{args.warmup} warm-up, +1 memory call), compile {meta['compiled'] if args.compile else False}, "
          f"torch {torch.__version__}; memory = peak working memory of one call (see module docstring)\n")  # fmt: skip
    print_table(rows)
    if args.json:
        write_json({"settings": meta, "rows": rows}, args.json)  # atomic
        print(f"\nrows written to {args.json}")
    print_attention_bias(models[0].ae.decoder, sorted(set(args.sizes) | {256, 512}), args.batch, dtype,
                         args.attention_backend)  # fmt: skip
    return {"settings": meta, "rows": rows}


if __name__ == "__main__":
    main()
