"""Weight files: safetensors first; legacy torch files only with ``weights_only=True``.

Loading never executes pickled code, and a damaged file fails with a message naming it.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model


class CheckpointError(RuntimeError):
    """A weight file is missing, truncated, refused, or does not fit the model."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (tensors only, no pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if not found:  # not a torch file at all
            raise CheckpointError(f"checkpoint {path} is unreadable or truncated") from error
        raise CheckpointError(
            f"checkpoint {path} was refused: it would call {found.group(1)} when unpickled "
            "(nothing was executed; only tensor files load)"
        ) from error
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {error}") from error
    if isinstance(state, dict) and "state_dict" in state:  # common wrapper layout
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds {type(state).__name__}, not a state dict")
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{source} does not fit {type(module).__name__} (different architecture?): "
            f"{str(error).splitlines()[0]}"
        ) from error


def load_safetensors_into(module: torch.nn.Module, path: str | Path) -> None:
    """Load a whole-module ``.safetensors`` file (shared tensors allowed) strictly; a truncated
    file or another architecture's weights raise ``CheckpointError`` naming the file."""
    try:
        load_model(module, str(path), strict=True)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise CheckpointError(
            f"{path} is truncated or from a different architecture: {str(error).splitlines()[0]}"
        ) from error
