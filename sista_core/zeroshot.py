"""Zero-shot classification: score images against report-style prompts, no labels needed.

Each finding has a positive and a negative prompt set, phrased the way radiology reports
state and deny it, since reports are all the text encoder saw. A finding's logit is the
image's similarity to the positives' mean embedding minus its similarity to the negatives'
(CLIP's prompt ensembling, made two-sided), so 0 is the decision point and the scores are
ready for ``sista_core.probe.macro_auroc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .findings import CHEXPERT_COMPETITION

if TYPE_CHECKING:
    from .model import SISTAModel

# finding -> (positive prompts, negative prompts); sides and severities vary so that the
# mean embedding stands for the finding, not for one laterality.
PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Atelectasis": (
        (
            "Left basilar atelectasis.",
            "Mild right basilar atelectasis.",
            "Bibasilar atelectasis.",
            "Plate-like atelectasis in the left lung base.",
            "Right lower lobe atelectasis.",
        ),
        (
            "No atelectasis.",
            "No focal airspace disease or atelectasis.",
            "The lungs are clear without atelectasis.",
        ),
    ),
    "Cardiomegaly": (
        (
            "Cardiomegaly.",
            "The heart is enlarged.",
            "Moderate cardiomegaly.",
            "Mild cardiomegaly with stable mediastinal contours.",
        ),
        (
            "Heart size is normal.",
            "No cardiomegaly.",
            "The cardiomediastinal silhouette is within normal limits.",
        ),
    ),
    "Consolidation": (
        (
            "Right lower lobe consolidation.",
            "Left lower lobe consolidation.",
            "Focal consolidation in the right upper lobe.",
            "Airspace consolidation in the left lung base.",
        ),
        (
            "No focal consolidation.",
            "No consolidation.",
            "The lungs are clear without focal airspace disease.",
        ),
    ),
    "Edema": (
        (
            "Pulmonary edema.",
            "Mild interstitial edema.",
            "Moderate pulmonary edema with vascular congestion.",
            "Bilateral perihilar edema.",
        ),
        (
            "No pulmonary edema.",
            "No edema.",
            "No vascular congestion or edema.",
        ),
    ),
    "Pleural Effusion": (
        (
            "There is a left pleural effusion.",
            "Small right pleural effusion.",
            "Moderate left pleural effusion.",
            "Bilateral pleural effusions.",
        ),
        (
            "No pleural effusion.",
            "No pleural effusions.",
            "The costophrenic angles are sharp without effusion.",
        ),
    ),
}


def prompt_set_embedding(prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """Normalised prompt embeddings (P, d) -> their normalised mean (d,)."""
    return F.normalize(prompt_embeddings.mean(0), dim=-1)


def contrast_logits(
    image_emb: torch.Tensor, positive_emb: torch.Tensor, negative_emb: torch.Tensor
) -> torch.Tensor:
    """cos(image, positive) - cos(image, negative): image_emb (B, d), positive_emb and
    negative_emb (C, d), all normalised -> (B, C)."""
    return image_emb @ (positive_emb - negative_emb).T


def finding_embeddings(
    model: SISTAModel, findings: Sequence[str] = CHEXPERT_COMPETITION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative prompt-set embeddings (C, d) each, in the order of ``findings``."""
    unknown = [finding for finding in findings if finding not in PROMPTS]
    if unknown:
        raise ValueError(f"no prompts for {unknown}; prompts exist for {list(PROMPTS)}")
    positive, negative = [], []
    for finding in findings:
        positive_prompts, negative_prompts = PROMPTS[finding]
        positive.append(prompt_set_embedding(model.encode_text(list(positive_prompts))["global"]))
        negative.append(prompt_set_embedding(model.encode_text(list(negative_prompts))["global"]))
    return torch.stack(positive), torch.stack(negative)


def zero_shot_logits(
    model: SISTAModel,
    images: torch.Tensor,
    findings: Sequence[str] = CHEXPERT_COMPETITION,
    batch_size: int = 64,
) -> torch.Tensor:
    """uint8 images (B, H, W) at the model's size, on its device -> zero-shot logits (B, C),
    one column per finding. Puts the model in eval mode."""
    model.eval()
    with torch.inference_mode():
        positive, negative = finding_embeddings(model, findings)
        image_emb = torch.cat(
            [
                model.encode_image(model.image_encoder.normalize(batch))["global"]
                for batch in images.split(batch_size)
            ]
        )
    return contrast_logits(image_emb, positive.to(image_emb), negative.to(image_emb))
