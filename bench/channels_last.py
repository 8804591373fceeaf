"""Image-encoder layout benchmark: channels-last vs the default NCHW input, same weights.

``ImageEncoder`` hands a CNN its input in channels-last layout; this measures why: one
pre-training step of the image encoder (forward and backward) and one inference pass
(evaluation's feature extraction), per batch, on one torch thread (a Ray Train worker's
share of the CPU). The two layouts take turns and the best of the repeats is kept, so the
ratio holds on a shared machine. Random inputs: only the arithmetic's speed is measured.

    python -m bench.channels_last                          # EfficientNet-Lite0, 96 px, B=32
    python -m bench.channels_last --model resnet18 --size 128
"""

from __future__ import annotations

import argparse

import timm
import torch

from bench.losses import best_seconds


def measure(model: str, size: int, batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False, num_classes=0)
    images = torch.randn(batch, 3, size, size)
    layouts = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}

    def train_step(layout):
        def step():
            net.zero_grad()
            net(images.contiguous(memory_format=layout)).sum().backward()

        return step

    def inference(layout):
        def step():
            with torch.inference_mode():
                net(images.contiguous(memory_format=layout))

        return step

    rows = []
    for what, make in (("train step", train_step), ("inference", inference)):
        # the layouts take turns, best of the repeats after a warm-up each
        base, fast = best_seconds([make(layout) for layout in layouts.values()], repeats)
        rows.append({"pass": what, "NCHW_s": base, "channels_last_s": fast, "speedup": base / fast})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.model, args.size, args.batch, args.repeats)
    print(f"{args.model}, {args.size} px, batch {args.batch}, {args.threads} torch thread(s)")
    print("| pass | NCHW (baseline) | channels-last | speedup |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['pass']} | {row['NCHW_s'] * 1000:.0f} ms | "
            f"{row['channels_last_s'] * 1000:.0f} ms | {row['speedup']:.2f}x |"
        )
    return rows


if __name__ == "__main__":
    main()
