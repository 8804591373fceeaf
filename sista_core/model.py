"""SISTAModel: image and text encoders, projection heads, and the SISTA objective."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from .checkpoint import CheckpointError, load_safetensors_into
from .config import SISTAConfig
from .encoders import ImageEncoder, TextEncoder, TokenizedText
from .losses import IntraLoss, SIALoss, STALoss

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TEXT_FOLDER = "text_encoder"  # tokenizer + architecture config, so no hub is needed to load


class ProjectionHead(nn.Module):
    """Two-layer MLP to the joint space (g_v, g_t in docs/method.md)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SISTAModel(nn.Module):
    """Encoders + projections; ``forward`` returns embeddings, every loss term and diagnostics."""

    def __init__(
        self,
        config: SISTAConfig | None = None,
        *,
        image_encoder: ImageEncoder | None = None,
        text_encoder: TextEncoder | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or SISTAConfig()
        self.image_encoder = image_encoder or ImageEncoder(
            config.image.name,
            pretrained=config.image.pretrained,
            img_size=config.image.img_size,
            checkpoint=config.image.checkpoint,
        )
        self.text_encoder = text_encoder or TextEncoder(
            config.text.name_or_path,
            freeze_layers=config.text.freeze_layers,
            max_length=config.text.max_length,
        )
        image_dim, text_dim, joint_dim = (
            self.image_encoder.num_features,
            self.text_encoder.num_features,
            config.embed_dim,
        )
        self.image_global_proj = ProjectionHead(image_dim, joint_dim)
        self.text_global_proj = ProjectionHead(text_dim, joint_dim)
        self.image_local_proj = nn.Linear(image_dim, joint_dim)
        self.text_local_proj = nn.Linear(text_dim, joint_dim)
        sia, sta = config.sia, config.sta
        self.sia_loss = SIALoss(sia.temperature, sia.threshold, sia.mode, sia.alpha, sia.sigma)
        self.intra_loss = IntraLoss(sia.temperature, sia.sigma)
        self.sta_loss = STALoss(sta.temperature_attn, sta.temperature_local, sta.sparse, sta.topk)

    def encode_image(self, images: torch.Tensor) -> dict[str, Any]:
        """Normalised float images (B, 3, H, W) -> global (B, d) and local (B, Np, d) embeddings."""
        features = self.image_encoder(images)
        return {
            "global": F.normalize(self.image_global_proj(features["global"]), dim=-1),
            "patches": self.image_local_proj(features["patches"]),
            "grid": features["grid"],
        }

    def encode_text(self, texts: list[str] | TokenizedText) -> dict[str, Any]:
        """Texts (raw or pre-tokenised) -> global (B, d) and word (B, Nw, d) embeddings."""
        tokens = texts if isinstance(texts, TokenizedText) else self.text_encoder.tokenize(texts)
        features = self.text_encoder(tokens)
        return {
            "global": F.normalize(self.text_global_proj(features["global"]), dim=-1),
            "words": self.text_local_proj(features["words"]),
            "word_mask": features["word_mask"],
            "words_text": features["words_text"],
        }

    def forward(
        self,
        images: torch.Tensor,
        texts: list[str] | TokenizedText,
        report_semantics: torch.Tensor,
        *,
        return_attention: bool = False,
    ) -> dict[str, Any]:
        """images: normalised (B, 3, H, W); texts: B reports; report_semantics: (B, ds) fixed
        report vectors from the similarity cache. Loss terms whose weight is 0 are skipped."""
        weights = self.config.loss
        image, text = self.encode_image(images), self.encode_text(texts)
        zero = image["global"].new_zeros(())
        out: dict[str, Any] = {
            "image_embed": image["global"],
            "text_embed": text["global"],
            "loss_sia": zero,
            "loss_sta": zero,
            "loss_intra": zero,
            "fraction_negatives_eliminated": zero,
            "attention_nonzero_per_word": zero,
            "grid": image["grid"],
            "words_text": text["words_text"],
        }
        if weights.sia_weight:
            sia = self.sia_loss(image["global"], text["global"], report_semantics)
            out["loss_sia"] = sia["loss"]
            out["fraction_negatives_eliminated"] = sia["fraction_eliminated"]
        if weights.intra_weight:
            out["loss_intra"] = self.intra_loss(image["global"], report_semantics)
        if weights.sta_weight or return_attention:
            sta = self.sta_loss(text["words"], text["word_mask"], image["patches"])
            out["loss_sta"] = sta["loss"]
            out["attention_nonzero_per_word"] = sta["attention_nonzero_per_word"]
            if return_attention:
                out["attention"] = sta["attention"]
        out["loss"] = (
            weights.sia_weight * out["loss_sia"]
            + weights.sta_weight * out["loss_sta"]
            + weights.intra_weight * out["loss_intra"]
        )
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        """``model.safetensors`` + ``config.json`` (+ the tokenizer); no pickle anywhere."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / WEIGHTS_FILE))
        self.text_encoder.tokenizer.save_pretrained(directory / TEXT_FOLDER)
        self.text_encoder.model.config.save_pretrained(directory / TEXT_FOLDER)
        manifest = {
            "format_version": FORMAT_VERSION,
            "sista": self.config.to_dict(),
            "image_encoder": asdict(self.image_encoder.config),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SISTAModel:
        """Rebuild a saved model from its folder alone (no hub, no original text-model path)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for required in (config_path, weights_path, directory / TEXT_FOLDER):
            if not required.exists():
                raise CheckpointError(
                    f"{directory} is not a saved SISTAModel: {required.name} missing"
                )
        manifest = json.loads(config_path.read_text())
        config = SISTAConfig.from_dict(manifest["sista"])
        config.image.pretrained, config.image.checkpoint = False, None
        text_folder = directory / TEXT_FOLDER
        text_model = AutoModel.from_config(AutoConfig.from_pretrained(text_folder))
        text_encoder = TextEncoder.from_parts(
            AutoTokenizer.from_pretrained(text_folder),
            text_model,
            config.text.freeze_layers,
            config.text.max_length,
        )
        model = cls(
            config,
            image_encoder=ImageEncoder.from_config(manifest["image_encoder"]),
            text_encoder=text_encoder,
        )
        load_safetensors_into(model, weights_path)
        return model
