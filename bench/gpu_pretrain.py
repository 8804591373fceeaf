"""GPU pre-training benchmark: samples/s of the SISTA training step at ViT-B/16 224 px, fp32
against the GPU path of ``components.stages.pretrain`` (bf16 autocast, channels-last, pinned
host memory, and ``torch.compile`` as a separate row), for a fixed number of steps.

One process, one GPU, no Ray: the step is ``bench.pretrain_scaling``'s (the training step of
``train_loop_per_worker``), on synthetic pairs (random uint8 images, random report vectors,
radiology words through the real tokenizer). Each configuration builds a fresh model with
the same seed and runs ``--warmup`` untimed steps (compilation happens there) and then
``--steps`` timed ones, synchronising the device around each.

    python -m bench.gpu_pretrain                       # on a GPU machine: ~2-4 minutes
    python -m bench.gpu_pretrain --device cpu --image vit_tiny_patch16_224 --img-size 32 \\
        --batch 2 --steps 1 --warmup 0                 # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.pretrain_scaling import synthetic_pairs
from components.stages.pretrain import accelerate
from sista_core import SISTAConfig, SISTAModel
from sista_core.encoders.text import collate_tokens

# name -> (bf16, channels_last, compile); the first is the baseline of the ratios.
CONFIGURATIONS = {
    "fp32": (False, False, False),
    "bf16 + channels-last": (True, True, False),
    "bf16 + channels-last + compile": (True, True, True),
}

# Dense bfloat16 tensor-core peaks (vendor data sheets, no sparsity), by device name.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
}


def bf16_peak_flops(device_name: str) -> float | None:
    """The GPU's dense bfloat16 peak in FLOP/s, or None for a device not in the table."""
    for name, tflops in BF16_PEAK_TFLOPS.items():
        if name in device_name:
            return tflops * 1e12
    return None


def model_config(image: str, img_size: int) -> dict[str, Any]:
    return {
        "image": {"name": image, "img_size": img_size, "pretrained": False},
        "text": {"freeze_layers": 4, "max_length": 64},
        "embed_dim": 128,
    }


def run_configuration(
    name: str, device: torch.device, settings: dict[str, Any]
) -> dict[str, float | str]:
    bf16, channels_last, compile_ = CONFIGURATIONS[name]
    torch.manual_seed(0)
    model = SISTAModel(SISTAConfig.from_dict(model_config(settings["image"], settings["img_size"])))
    model.to(device).train()
    accelerate(model, bf16=bf16, channels_last=channels_last, compile=compile_)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokenizer = model.text_encoder.tokenizer
    batch, steps = settings["batch"], settings["warmup"] + settings["steps"]
    data = synthetic_pairs(batch * steps, settings["img_size"], 64, tokenizer, 384, seed=0)
    on_gpu = device.type == "cuda"

    def to_device(array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor.pin_memory().to(device, non_blocking=True) if on_gpu else tensor

    def train_step(pairs) -> None:
        images = model.image_encoder.normalize(to_device(pairs.images))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        tokens = collate_tokens(pairs.tokens, tokenizer.pad_token_id).to(device)
        semantics = to_device(pairs.semantics)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images, tokens, semantics)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    if "flops_per_step" not in settings and not compile_:
        # Once, on an uncompiled model (the maths of every configuration is the same): one
        # extra step under FLOP counting, forward, backward and optimizer as dispatched.
        with FlopCounterMode(display=False) as counter:
            train_step(next(iter(data.batches(0, 0, 1, batch, seed=0))))
        settings["flops_per_step"] = counter.get_total_flops()
    elapsed, timed_steps = 0.0, 0
    for step, pairs in enumerate(data.batches(0, 0, 1, batch, seed=0)):
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_step(pairs)
        if on_gpu:
            torch.cuda.synchronize()
        if step >= settings["warmup"]:
            elapsed += time.perf_counter() - started
            timed_steps += 1
    flops_per_s = settings.get("flops_per_step", float("nan")) * timed_steps / elapsed
    return {
        "configuration": name,
        "samples_per_s": batch * timed_steps / elapsed,
        "step_ms": 1e3 * elapsed / timed_steps,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan"),
        "model_tflops_per_s": flops_per_s / 1e12,
        "mfu": flops_per_s / settings["peak_flops"] if settings.get("peak_flops") else None,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_pretrain", description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGURATIONS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_pretrain.json"))
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's dense bf16 peak (default: from its name)"
    )
    parser.add_argument(
        "--skip-without-gpu", action="store_true", help="exit 0 with a message when no GPU"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        if args.skip_without_gpu:
            print("gpu-check skipped: no CUDA device on this machine (nothing was measured)")
            return []
        raise SystemExit("no CUDA device here: pass --device cpu for a smoke run")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else bf16_peak_flops(device_name)
    settings = vars(args) | {"img_size": args.img_size, "peak_flops": peak}
    rows = []
    for name in args.configs.split(","):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows.append(run_configuration(name, device, settings))
        print(json.dumps(rows[-1]), flush=True)
    baseline = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup"] = row["samples_per_s"] / baseline
    print_summary(rows, device_name, peak, settings)
    result = {
        "device": device_name,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "flops_per_step": settings.get("flops_per_step"),
        "torch": torch.__version__,
        "settings": {k: settings[k] for k in ("image", "img_size", "batch", "steps", "warmup")},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return rows


def print_summary(rows: list[dict[str, Any]], device: str, peak: float | None, settings) -> None:
    """samples/s and model FLOPs utilisation of each configuration, one line each."""
    print(
        f"{settings['image']} at {settings['img_size']} px, batch {settings['batch']}, on {device}"
        f" (bf16 peak {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown: pass --peak-tflops'});"
        f" {settings.get('flops_per_step', float('nan')) / 1e9:.1f} GFLOP per training step"
    )
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f} %" if row["mfu"] is not None else "n/a"
        print(
            f"  {row['configuration']:32s} {row['samples_per_s']:8.1f} samples/s"
            f"  {row['model_tflops_per_s']:7.1f} TFLOP/s  MFU {mfu}"
        )


if __name__ == "__main__":
    main()
