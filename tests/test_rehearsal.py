"""benchmarks/rehearsal.py (`make rehearsal`) and benchmarks/rehearsal_probe.py: the ImageNet-layout data, the command
lines (each recipe config with only data, batch, steps, precision and hardware overridden), the stand-in weights in
the real caches, the probe that measures FLOPs and activations inside a real run, the CUDA autocast policy and the
GPU projection. The full-size rehearsal itself (900 CPU seconds) is not run here."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the CLI imports `benchmarks.rehearsal_probe.StepProbe` by name
    sys.path.insert(0, str(ROOT))

from benchmarks import rehearsal, rehearsal_probe


def test_imagenet_layout_from_the_default_photos_becomes_shards(tmp_path):
    from dcssdae.photos import photo_items
    from dcssdae.shards import main as shards

    held_out = {item.key for item in photo_items((rehearsal.held_out_split(),))[rehearsal.held_out_split()]}
    counts = rehearsal.write_imagenet_folders(tmp_path / "src", classes=3, train_photos=4, train_crops=2)
    assert counts == {"train": 8, "val": len(held_out)}
    for split in ("train", "val"):
        folders = sorted(p.name for p in (tmp_path / "src" / split).iterdir())
        assert folders == ["n90000000", "n90000001", "n90000002"]  # class folders, as ImageNet's wnids
    train = {p.stem.rsplit("_", 1)[0] for p in (tmp_path / "src" / "train").rglob("*.JPEG")}
    assert len(train) == 4 and not train & held_out
    assert shards([str(tmp_path / "src" / "train"), str(tmp_path / "train"), "--workers", "1", "--no-progress"]) == 0
    assert shards([str(tmp_path / "src" / "val"), str(tmp_path / "val"), "--classes",
                   str(tmp_path / "train" / "manifest.json"), "--workers", "1", "--no-progress"]) == 0
    manifests = [json.loads((tmp_path / s / "manifest.json").read_text()) for s in ("train", "val")]
    assert [m["total"] for m in manifests] == [8, len(held_out)]
    assert manifests[0]["classes"] == manifests[1]["classes"]


def test_standin_weights_are_found_by_the_real_loaders(tmp_path):
    """LPIPS's torchvision backbone and REPA's timm encoder load the random files from the caches the environment
    names (in a new process: the Hugging Face cache location is read at import). The small SqueezeNet and ViT-Ti
    take the place of VGG16 / AlexNet and DINOv2-B: the same loaders and cache layouts."""
    env = rehearsal_probe.write_standin_weights(tmp_path, ("squeezenet1_1",), ("vit_tiny_patch16_224",))
    assert env == rehearsal.standin_env(tmp_path)
    code = (
        "import torch, safetensors.torch, sys\n"
        "from pathlib import Path\n"
        "from dcssdae.losses import LPIPSLoss, REPALoss\n"
        "root = Path(sys.argv[1])\n"
        "lpips = LPIPSLoss('squeeze', 'lpips').load()._model.net\n"
        "saved = torch.load(next((root / 'torch/hub/checkpoints').glob('squeezenet1_1-*.pth')), weights_only=True)\n"
        "assert torch.equal(lpips.net.slice1[0].weight, saved['features.0.weight'])\n"
        "repa = REPALoss(64, encoder='vit_tiny_patch16_224').load()._encoder.net\n"
        "file = next((root / 'hf').rglob('model.safetensors'))\n"
        "assert torch.equal(repa.patch_embed.proj.weight, safetensors.torch.load_file(file)['patch_embed.proj.weight'])\n"
        "print('OK')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                            check=False, env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_cuda_autocast_policy_keeps_norms_in_fp32_under_cpu_autocast():
    x, w = torch.randn(2, 8, 6, 6, requires_grad=True), torch.randn(8, 8, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.group_norm(F.conv2d(x, w, padding=1), 4)
        with rehearsal_probe.CudaAutocastPolicy():
            y = F.conv2d(x, w, padding=1)
            policy = F.group_norm(y, 4)
            soft = torch.softmax(y, dim=-1)
    assert plain.dtype == torch.bfloat16  # what the CPU's autocast does
    assert y.dtype == torch.bfloat16 and policy.dtype == soft.dtype == torch.float32  # what CUDA's does
    with rehearsal_probe.CudaAutocastPolicy():  # without autocast: untouched
        assert F.group_norm(y, 4).dtype == torch.bfloat16


def _probe(tiny_cli, name: str, batch: int, steps: int) -> dict:
    assert tiny_cli("fit", name, "--data.batch_size", str(batch), "--trainer.precision", "bf16-mixed",
                    "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
                    f"--trainer.callbacks+={rehearsal.PROBE}") == 0
    return json.loads((tiny_cli.work / "runs" / name / rehearsal.PROBE_FILE).read_text())


@pytest.mark.slow
def test_probe_measures_a_real_run_per_image(tiny_cli):
    """~20-40 s on 2 cores. The quick-start (tiny networks) at batches 1 and 2: FLOPs and saved activations per image
    agree, what does not grow with the batch (weights, their bf16 copies) is counted per step, and the memory
    inventory matches the model."""
    one, two = _probe(tiny_cli, "probe1", 1, steps=2), _probe(tiny_cli, "probe2", 2, steps=1)
    assert one["batch"] == 1 and two["batch"] == 2 and len(one["steps"]) == 2  # every step recorded
    assert two["flops_per_image"] == pytest.approx(one["flops_per_image"], rel=0.02) and one["flops_per_image"] > 0
    assert two["saved_per_image_bytes"] == pytest.approx(one["saved_per_image_bytes"], rel=0.1)
    assert one["saved_per_step_bytes"] > 0 and one["peak_rss_delta_bytes"] > 0
    memory = one["memory_bytes"]
    assert memory["trained"] == 4 * one["trainable_params"]  # fp32 parameters: gradients and moments as large
    assert memory["weights"] >= 4 * one["params"] and memory["ema"] >= 4 * one["params"]
    projected = rehearsal.project_memory(one, batch=24)
    assert projected["activations"] == 24 * one["saved_per_image_bytes"]
    assert projected["adamw_moments"] == 2 * memory["trained"] and projected["total"] == sum(
        v for k, v in projected.items() if k != "total")


def test_phase_entry_projects_at_the_configs_batch():
    probe = {"params": 10, "trainable_params": 10, "image_size": 256, "batch": 1, "flops_per_image": 1e12,
             "saved_per_step_bytes": 2**30, "saved_per_image_bytes": 2**30, "peak_rss_delta_bytes": 2**31,
             "memory_bytes": {"weights": 0, "frozen": 0, "trained": 0, "ema": 0}, "steps": [{"seconds": 1.0}]}
    entry = rehearsal.phase_entry("configs/phase1_24gb.yaml", probe, steps=2, budget_gib=24)
    assert (entry["batch_size"], entry["accumulate_grad_batches"], entry["max_steps"]) == (8, 3, 200000)
    assert entry["projected_gpu_memory_gib"] == 1 + 8  # per step + 8 images of activations
    step = 1e12 * 8 * 3 / (rehearsal.UTILISATION * rehearsal.H100_BF16_FLOPS)
    assert entry["projected_h100_step_s"] == pytest.approx(step, abs=1e-3)
    assert entry["projected_recipe_hours"] == pytest.approx(step * 200000 / 3600, abs=0.05) and entry["fits"]
    assert rehearsal.phase_entry("configs/phase2.yaml", probe, steps=2)["batch_size"] == 8


# What the rehearsal may change in a recipe: data, batch, steps, precision, hardware, the run folder, the previous
# phase's checkpoint; plus the measuring callback.
ALLOWED = {"--data.train_shards", "--data.val_shards", "--data.batch_size", "--data.val_batch_size",
           "--data.num_workers", "--trainer.max_steps", "--trainer.precision", "--trainer.accelerator",
           "--trainer.devices", "--trainer.default_root_dir", "--model.init_from"}


def _options(tokens: list[str]) -> dict[str, str]:
    options, i = {}, 0
    while i < len(tokens):
        if "=" in tokens[i]:
            key, value = tokens[i].split("=", 1)
            i += 1
        else:
            key, value = tokens[i], tokens[i + 1]
            i += 2
        options[key] = value
    return options


def test_each_phase_runs_its_config_with_only_data_batch_steps_precision_and_hardware_changed(tmp_path):
    args = Namespace(steps=2, batch=1, precision="bf16-mixed", val_images=6, overlay=None)
    steps = dict(rehearsal.commands(tmp_path, "TRAIN", "VAL", args, py="PY"))
    assert list(steps) == [*rehearsal.PHASES, "export", "validate", "latent_stats"]
    previous = None
    for phase in rehearsal.PHASES:
        if phase == "distill":  # `make distill` with the phase-3 checkpoint and ARGS
            make, target, py, ckpt, extra = steps[phase][0], steps[phase][2], *steps[phase][3:]
            phase3 = f"PHASE3_CKPT={tmp_path}/phase3/checkpoints/last.ckpt"
            assert (make, target, py, ckpt) == ("make", "distill", "PY=PY", phase3)
            options = _options(shlex.split(extra.removeprefix("ARGS=")))
        else:
            command = steps[phase]
            assert command[:6] == ["PY", "-m", "dcssdae.cli", "fit", "--config", f"configs/{phase}.yaml"]
            options = _options(command[6:])
            expected = f"{tmp_path}/{previous}/checkpoints/last.ckpt" if previous else None
            assert options.get("--model.init_from") == expected
        assert options.pop("--trainer.callbacks+") == "benchmarks.rehearsal_probe.StepProbe"
        assert set(options) <= ALLOWED, set(options) - ALLOWED
        assert options["--trainer.default_root_dir"] == str(tmp_path / phase)
        assert (options["--data.batch_size"], options["--trainer.max_steps"]) == ("1", "2")
        previous = phase
    assert steps["export"][4:6] == [str(tmp_path / "distill" / "checkpoints" / "last.ckpt"), str(tmp_path / "export")]


def test_make_targets():
    out = subprocess.run(["make", "-n", "rehearsal", "RUNS=/x"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "benchmarks/rehearsal.py --out /x/rehearsal" in out
    out = subprocess.run(["make", "-n", "distill", "PHASE3_CKPT=p3.ckpt", "ARGS=--trainer.max_steps 3"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "--config configs/distill.yaml --model.init_from p3.ckpt --trainer.max_steps 3" in out
