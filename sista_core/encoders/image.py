"""Image encoder: any timm backbone behind one contract (global vector + patch tokens).

Every downstream head plugs into this contract, never into a backbone's internals.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from ..checkpoint import CheckpointError, load_into, load_state_dict_file
from .pretrained_weights import TIMM_NAMES as OFFLINE_PRETRAINED
from .pretrained_weights import load_efficientnet_lite0


@dataclass(frozen=True)
class ImageEncoderConfig:
    """What rebuilds an ``ImageEncoder`` (saved beside the weights)."""

    name: str = "resnet50"
    img_size: int = 224
    in_chans: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


def _create_backbone(name: str, pretrained: bool, img_size: int) -> nn.Module:
    """timm model without classifier; passes ``img_size`` to the families that take it (ViT).
    ``pretrained``: EfficientNet-Lite0's ImageNet weights from their installed package
    (offline, with their own normalisation), timm's hub download for any other name."""
    offline = pretrained and name in OFFLINE_PRETRAINED
    from_hub = pretrained and not offline
    try:
        backbone = timm.create_model(name, pretrained=from_hub, num_classes=0, img_size=img_size)
    except TypeError:  # CNNs take any input size and reject the keyword
        backbone = timm.create_model(name, pretrained=from_hub, num_classes=0)
    if offline:
        load_efficientnet_lite0(backbone, include_classifier=False)
    return backbone


class ImageEncoder(nn.Module):
    """timm backbone returning ``{"global": (B, Dv), "patches": (B, Np, Dv), "grid": (h, w)}``.

    Patches are a ViT's tokens without its prefix (class/register) tokens, or the cells of a
    CNN's last feature map, row-major, so ``patches.view(B, h, w, Dv)`` is the spatial map.
    Inputs are normalised float images (B, 3, H, W); ``normalize`` turns uint8 into that.
    """

    def __init__(
        self,
        name: str = "resnet50",
        pretrained: bool = False,
        img_size: int = 224,
        checkpoint: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.backbone = _create_backbone(name, pretrained, img_size)
        data_config = timm.data.resolve_data_config({}, model=self.backbone)
        self.config = ImageEncoderConfig(
            name=name,
            img_size=img_size,
            in_chans=int(data_config["input_size"][0]),
            mean=tuple(float(m) for m in data_config["mean"]),
            std=tuple(float(s) for s in data_config["std"]),
        )
        self.num_features: int = int(self.backbone.num_features)
        self._prefix_tokens: int = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self._channels_last_output = getattr(self.backbone, "output_fmt", "NCHW") == "NHWC"
        # CNNs get channels-last inputs: PyTorch's CPU convolutions (depthwise ones above all)
        # run 1.4x faster forward and backward on EfficientNet-Lite0 (docs/performance.md).
        self._convolutional = not hasattr(self.backbone, "patch_embed")
        self.register_buffer("_mean", torch.tensor(self.config.mean).view(1, -1, 1, 1), False)
        self.register_buffer("_std", torch.tensor(self.config.std).view(1, -1, 1, 1), False)
        if checkpoint is not None:
            load_into(self.backbone, load_state_dict_file(checkpoint), str(checkpoint))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W) or (B, C, H, W), C in {1, 3} -> normalised float (B, 3, H, W).

        The one place where pixel scaling happens, so training and evaluation cannot drift.
        """
        if images.ndim == 3:
            images = images[:, None]
        images = images.float() / 255.0
        if images.shape[1] == 1 and self.config.in_chans == 3:
            images = images.expand(-1, 3, -1, -1)
        return (images - self._mean) / self._std

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        if self._convolutional and images.ndim == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | tuple[int, int]]:
        features = self.backbone.forward_features(self._layout(images))
        pooled = self.backbone.forward_head(features, pre_logits=True)
        if features.ndim == 4:  # CNN feature map
            if not self._channels_last_output:
                features = features.permute(0, 2, 3, 1)
            grid = (int(features.shape[1]), int(features.shape[2]))
            patches = features.flatten(1, 2)
        else:  # token sequence
            patches = features[:, self._prefix_tokens :]
            grid = (
                tuple(
                    int(g) for g in self.backbone.patch_embed.dynamic_feat_size(images.shape[-2:])
                )
                if hasattr(self.backbone, "patch_embed")
                else (patches.shape[1], 1)
            )
        return {"global": pooled, "patches": patches, "grid": grid}

    def pyramid(self, images: torch.Tensor, levels: int = 4) -> list[torch.Tensor]:
        """Feature maps [(B, C_i, h_i, w_i)] of ``levels`` evenly spaced stages, shallow to deep.

        The spacing ends at the deepest stage and steps back by ``stages // levels``: ViT-B/16's
        blocks 3, 6, 9, 12 (SETR's choice), a ResNet's layer1-4 (strides 4-32, not the stem).
        A ViT's levels all share the patch grid; a CNN's halve in resolution stage by stage.
        """
        stages = len(self.backbone.feature_info)
        if not 1 <= levels <= stages:
            raise ValueError(f"{self.config.name} has {stages} stages; cannot take {levels} levels")
        step = stages // levels
        indices = [stages - 1 - step * (levels - 1 - level) for level in range(levels)]
        return self.backbone.forward_intermediates(
            self._layout(images), indices=indices, output_fmt="NCHW", intermediates_only=True
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``image_encoder.safetensors`` and ``image_encoder.json`` to ``directory``."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.backbone, str(directory / "image_encoder.safetensors"))
        (directory / "image_encoder.json").write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_config(cls, config: ImageEncoderConfig | dict) -> ImageEncoder:
        if isinstance(config, dict):
            config = ImageEncoderConfig(**config)
        encoder = cls(config.name, pretrained=False, img_size=config.img_size)
        # The normalisation it was trained with (pretrained weights bring their own).
        encoder.config = config
        encoder._mean.copy_(torch.tensor(config.mean).view(1, -1, 1, 1))
        encoder._std.copy_(torch.tensor(config.std).view(1, -1, 1, 1))
        return encoder

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ImageEncoder:
        """Load the encoder from ``ImageEncoder.save_pretrained`` or from a whole
        ``SISTAModel.save_pretrained`` folder (its image-encoder weights only)."""
        directory = Path(directory)
        if (directory / "image_encoder.json").exists():
            config = json.loads((directory / "image_encoder.json").read_text())
            weights = directory / "image_encoder.safetensors"
            state = load_state_dict_file(weights)
        elif (directory / "config.json").exists():
            config = json.loads((directory / "config.json").read_text())["image_encoder"]
            weights = directory / "model.safetensors"
            prefix = "image_encoder.backbone."
            state = {
                key[len(prefix) :]: value
                for key, value in load_state_dict_file(weights).items()
                if key.startswith(prefix)
            }
        else:
            raise CheckpointError(
                f"{directory}: neither image_encoder.json nor config.json; not a saved encoder"
            )
        encoder = cls.from_config(config)
        load_into(encoder.backbone, state, str(weights))
        return encoder
