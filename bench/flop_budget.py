"""FLOPs of the paper profile's models, counted by ``torch.utils.flop_counter`` on the CPU
(random weights, no download): what docs/reproduce.md's compute table is built from.

    python -m bench.flop_budget
"""

from __future__ import annotations

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

BATCH = 2


def gflop_per_sample(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / BATCH / 1e9


def main() -> dict[str, float]:
    torch.set_num_threads(1)
    images = torch.randn(BATCH, 3, 224, 224)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    bert = BertModel(BertConfig())  # BERT-base: Bio_ClinicalBERT's architecture
    tokens = torch.randint(0, 28000, (BATCH, 128))

    def vit_forward() -> None:
        with torch.no_grad():
            vit(images)

    counts = {
        "ViT-B/16 224 px, forward + backward, per image": gflop_per_sample(
            lambda: vit(images).sum().backward()
        ),
        "ViT-B/16 224 px, forward, per image": gflop_per_sample(vit_forward),
        "BERT-base 128 tokens, forward + backward, per report": gflop_per_sample(
            lambda: bert(input_ids=tokens).last_hidden_state.sum().backward()
        ),
    }
    for name, value in counts.items():
        print(f"{value:8.1f} GFLOP  {name}")
    return counts


if __name__ == "__main__":
    main()
