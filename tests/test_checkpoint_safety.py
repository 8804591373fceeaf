"""Weight files never run code on load, and a damaged or foreign one fails with its name."""

from __future__ import annotations

import json

import pytest
import torch

from sista_core import SISTAConfig, SISTAModel
from sista_core.checkpoint import CheckpointError, load_state_dict_file
from sista_core.config import ImageConfig, TextConfig


class LeavesAMark:
    """Unpickling this calls ``open(marker, "w")``: code run by merely loading a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious_pt(path, marker) -> None:
    torch.save({"weight": torch.zeros(2), "payload": LeavesAMark(str(marker))}, path)


def test_a_pickle_that_runs_code_is_refused_and_never_executed(tmp_path):
    weights, marker = tmp_path / "encoder.pt", tmp_path / "executed"
    write_malicious_pt(weights, marker)
    with pytest.raises(CheckpointError, match=r"encoder\.pt was refused: .* io\.open") as caught:
        load_state_dict_file(weights)
    assert "\n" not in str(caught.value)
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(weights, weights_only=False)
    assert marker.exists()


def test_a_plain_tensor_file_still_loads(tmp_path):
    weights = tmp_path / "encoder.pt"
    torch.save({"state_dict": {"weight": torch.arange(3.0)}}, weights)
    assert torch.equal(load_state_dict_file(weights)["weight"], torch.arange(3.0))


def test_garbage_in_place_of_a_torch_file_is_unreadable_not_refused(tmp_path):
    weights = tmp_path / "encoder.pt"
    weights.write_bytes(b"\x80\x02not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"encoder\.pt is unreadable or truncated"):
        load_state_dict_file(weights)


def tiny(embed_dim: int) -> SISTAConfig:
    return SISTAConfig(
        image=ImageConfig(name="vit_tiny_patch16_224", img_size=32),
        text=TextConfig(max_length=16),
        embed_dim=embed_dim,
    )


def test_weights_of_another_architecture_fail_naming_the_file(tmp_path):
    SISTAModel(tiny(16)).save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / "config.json").read_text())
    manifest["sista"]["embed_dim"] = 24  # the config now describes another model
    (tmp_path / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model\.safetensors .*different architecture"):
        SISTAModel.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def training_state(tmp_path_factory):
    """A pre-training checkpoint folder as the pretrain stage writes it, plus its parts."""
    from components.stages.pretrain import save_training_state

    folder = tmp_path_factory.mktemp("checkpoint")
    model = SISTAModel(tiny(16))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    for parameter in trainable:
        parameter.grad = torch.full_like(parameter, 1e-3)
    optimizer.step()  # the optimizer now holds moment tensors for every parameter
    save_training_state(folder, model, optimizer, {"epoch": 1, "step": 9, "history": []})
    return folder, model, optimizer


def test_a_resumable_checkpoint_round_trips(training_state):
    from components.stages.pretrain import load_training_state

    folder, model, optimizer = training_state
    fresh = SISTAModel(tiny(16))
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    state = load_training_state(folder, fresh, fresh_optimizer)
    assert state["step"] == 9
    for (name, value), loaded in zip(
        model.state_dict().items(), fresh.state_dict().values(), strict=True
    ):
        assert torch.equal(value, loaded), name
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_a_resumable_checkpoint_with_a_pickle_payload_is_refused(training_state, tmp_path):
    from components.stages.pretrain import load_training_state

    folder, _, _ = training_state
    copy = tmp_path / "checkpoint"
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "executed"
    write_malicious_pt(copy / "optimizer.pt", marker)
    model = SISTAModel(tiny(16))
    with pytest.raises(CheckpointError, match=r"optimizer\.pt was refused"):
        load_training_state(copy, model, torch.optim.AdamW(model.parameters()))
    assert not marker.exists()


def test_a_truncated_resumable_checkpoint_fails_naming_the_file(training_state, tmp_path):
    from components.stages.pretrain import load_training_state

    folder, _, _ = training_state
    weights = tmp_path / "model.safetensors"
    data = (folder / "model.safetensors").read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_training_state(tmp_path, SISTAModel(tiny(16)), None)
