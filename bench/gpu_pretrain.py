"""GPU pre-training benchmark: samples/s of the SISTA training step at ViT-B/16 224 px, fp32
against the GPU path of ``components.pretrain`` (bf16 autocast, channels-last, pinned
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

from bench.pretrain_scaling import synthetic_pairs
from components.pretrain import accelerate
from sista_core import SISTAConfig, SISTAModel
from sista_core.encoders.text import collate_tokens

# name -> (bf16, channels_last, compile); the first is the baseline of the ratios.
CONFIGURATIONS = {
    "fp32": (False, False, False),
    "bf16 + channels-last": (True, True, False),
    "bf16 + channels-last + compile": (True, True, True),
}


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

    elapsed, timed_steps = 0.0, 0
    for step, pairs in enumerate(data.batches(0, 0, 1, batch, seed=0)):
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
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
        if on_gpu:
            torch.cuda.synchronize()
        if step >= settings["warmup"]:
            elapsed += time.perf_counter() - started
            timed_steps += 1
    return {
        "configuration": name,
        "samples_per_s": batch * timed_steps / elapsed,
        "step_ms": 1e3 * elapsed / timed_steps,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan"),
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
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu for a smoke run")
    settings = vars(args) | {"img_size": args.img_size}
    rows = []
    for name in args.configs.split(","):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows.append(run_configuration(name, device, settings))
        print(json.dumps(rows[-1]), flush=True)
    baseline = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup"] = row["samples_per_s"] / baseline
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "settings": {k: settings[k] for k in ("image", "img_size", "batch", "steps", "warmup")},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return rows


if __name__ == "__main__":
    main()
