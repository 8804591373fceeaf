import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from components.platform import config, profiles
from components.platform.config import ConfigError, Params, Section, load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("profile", ["params.yaml", "profiles/ci.yaml", "profiles/paper.yaml"])
def test_shipped_parameter_files_validate(profile):
    load_params(ROOT / profile)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"pretrain": {"optim": {"lrr": 0.1}}}, "pretrain.optim.lrr: unknown key"),
        ({"pretrian": {}}, "pretrian: unknown key"),
        (
            {"pretrain": {"optim": {"lr": -0.001}}},
            "pretrain.optim.lr: Input should be greater than 0",
        ),
        ({"pretrain": {"optim": {"batch_size": "big"}}}, "pretrain.optim.batch_size"),
        (
            {"ingest": {"downstream": {"label_fractions": [0.01, 1.5]}}},
            "ingest.downstream.label_fractions.1: Input should be less than or equal to 1",
        ),
        (
            {"ingest": {"downstream": {"label_fractions": [0.0]}}},
            "ingest.downstream.label_fractions.0: Input should be greater than 0",
        ),
        ({"ingest": {"source": "mimic_cxr"}}, "ingest.source_path is required"),
        ({"pretrain": {"sia": {"mode": "elimnate"}}}, "pretrain.sia.mode"),
        (
            {"pretrain": {"optim": {"lr_scales": {"text_encodr": 0.1}}}},
            "pretrain.optim.lr_scales.text_encodr",
        ),
        ({"evaluate": {"inits": ["sista", "convrit"]}}, "evaluate.inits: 'convrit' is neither"),
        ({"evaluate": {"inits": ["sista", "sista"]}}, "evaluate.inits lists a name twice"),
        ({"publish": {"gate": "strcit"}}, "publish.gate: Input should be 'bootstrap' or"),
        (
            {"publish": {"metric": "detection/phantom_opacity/map_40_75@0.01"}},
            "publish.gate bootstrap resamples macro AUROC, accuracy or Dice, not detection",
        ),
    ],
)
def test_a_bad_value_fails_naming_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError) as error:
        load_params(write(tmp_path, data))
    assert message in str(error.value)
    assert str(tmp_path / "params.yaml") in str(error.value)


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("pretrain: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)


def test_baselines_are_overrides_of_the_sista_section(tmp_path):
    params = load_params(write(tmp_path, {"pretrain": {"loss": {"intra_weight": 0.3}}}))
    convirt = params.pretrain.model_config_for("convirt")
    assert convirt.sia.mode == "none" and convirt.loss.sta_weight == 0
    dense = params.pretrain.model_config_for("dense")
    assert dense.sta.sparse == "softmax" and dense.loss.intra_weight == 0.3
    with pytest.raises(ConfigError, match="no 'simclr'"):
        params.pretrain.variant("simclr")


def test_a_baseline_added_for_an_ablation_can_be_evaluated(tmp_path):
    """`dvc exp run -S '+pretrain.baselines.intra_off=...' -S 'evaluate.inits=[...]'`"""
    data = {
        "pretrain": {"baselines": {"intra_off": {"loss": {"intra_weight": 0.0}}}},
        "evaluate": {"inits": ["sista", "intra_off", "random"]},
    }
    params = load_params(write(tmp_path, data))
    assert params.evaluate.inits == ("sista", "intra_off", "random")
    assert params.pretrain.model_config_for("intra_off").loss.intra_weight == 0.0


def test_every_profile_validates_and_reads_the_same_alone_or_composed(tmp_path):
    """A profile file lists only its changes: `sista profile NAME` writes them over the base,
    and `--params profiles/NAME.yaml` reads the file alone; both give the same settings."""
    for name in profiles.known()[1:]:
        composed = tmp_path / f"{name}.yaml"
        composed.write_text(profiles.profile_text(name))
        assert load_params(composed) == load_params(ROOT / "profiles" / f"{name}.yaml"), name
        assert load_params(composed) == Params.model_validate(profiles.profile_data(name))


def settings_in(kind: type, data: dict, path: str = "") -> dict[str, object]:
    """The pydantic field behind every key of a params mapping, by dotted key."""
    found = {}
    for name, value in data.items():
        field = kind.model_fields[name]
        found[path + name] = field
        inner = field.annotation
        if isinstance(value, dict) and isinstance(inner, type) and issubclass(inner, Section):
            found |= settings_in(inner, value, f"{path}{name}.")
    return found


def test_a_default_is_written_once_in_the_base_params_yaml():
    """The code has no second copy of a value the base sets: changing a default means editing
    params.yaml, and a key missing from a params file takes the base's value."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    copies = [key for key, field in settings_in(Params, base).items() if not field.is_required()]
    assert not copies, f"defaults written in components/platform/config.py too: {copies}"
    assert Params() == load_params(ROOT / "params.yaml")


def test_a_changed_default_reaches_every_file_that_does_not_set_it(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "profiles").mkdir(parents=True)
    base = (ROOT / "params.yaml").read_text()
    changed = base.replace("    temperature_attn: 0.1\n", "    temperature_attn: 0.2\n", 1)
    assert changed != base
    (root / "params.yaml").write_text(changed)
    shutil.copyfile(ROOT / "profiles/ci.yaml", root / "profiles/ci.yaml")
    monkeypatch.setattr(config, "ROOT", root)
    assert Params().pretrain.sta.temperature_attn == 0.2
    assert load_params(root / "profiles/ci.yaml").pretrain.sta.temperature_attn == 0.2
    assert profiles.profile_data("ci", root)["pretrain"]["sta"]["temperature_attn"] == 0.2
    assert Params(pretrain={"sta": {"topk": 4}}).pretrain.sta.temperature_attn == 0.2


def test_a_profile_changes_only_what_it_lists_and_replaces_named_collections():
    base, ci = profiles.profile_data("default"), profiles.profile_data("ci")
    overlay = yaml.safe_load((ROOT / "profiles" / "ci.yaml").read_text())
    assert ci["pretrain"]["image"]["name"] == overlay["pretrain"]["image"]["name"]
    assert ci["pretrain"]["sia"] == base["pretrain"]["sia"]  # not in the overlay: the base's
    # a collection of named sets is the profile's own, not merged with the base's
    assert ci["ingest"]["downstream"]["sets"] == overlay["ingest"]["downstream"]["sets"]
    assert "val_fraction" not in ci["ingest"]["downstream"]["sets"]["phantom_opacity"]


def test_the_token_length_is_set_once():
    params = load_params(ROOT / "profiles" / "ci.yaml")
    assert params.pretrain.text.max_length == params.reports.max_length == 48
    with pytest.raises(ValidationError, match="must equal pretrain.text.max_length"):
        Params.model_validate(
            {"reports": {"max_length": 32}, "pretrain": {"text": {"max_length": 64}}}
        )


def test_switching_profiles_keeps_the_base_and_puts_it_back(tmp_path):
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    base = (tmp_path / "params.yaml").read_text()
    profiles.switch("ci", tmp_path)
    assert load_params(tmp_path / "params.yaml") == load_params(tmp_path / "profiles/ci.yaml")
    profiles.switch("paper", tmp_path)  # from the kept base, not from ci
    assert load_params(tmp_path / "params.yaml") == load_params(tmp_path / "profiles/paper.yaml")
    with pytest.raises(ConfigError, match="no profile 'nope'; known: default, ci, paper"):
        profiles.switch("nope", tmp_path)
    profiles.switch("default", tmp_path)
    assert (tmp_path / "params.yaml").read_text() == base
    assert not (tmp_path / profiles.SAVED_BASE).exists()


def test_an_invalid_profile_names_its_key_and_writes_nothing(tmp_path):
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles/bad.yaml").write_text("pretrain:\n  optim:\n    lr: -1\n")
    base = (tmp_path / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"profiles/bad.yaml\): pretrain.optim.lr: .*greater"):
        profiles.switch("bad", tmp_path)
    assert (tmp_path / "params.yaml").read_text() == base
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml", "profiles"]


def test_dotted_overrides_set_one_number_and_keep_the_rest():
    from components.platform.config import with_overrides

    data = {"pretrain": {"loss": {"sta_weight": 1.0, "sia_weight": 1.0}}, "ray": {"num_cpus": 2}}
    changed = with_overrides(data, {"pretrain.loss.sta_weight": 0.5, "ray.num_cpus": None})
    assert changed == {
        "pretrain": {"loss": {"sta_weight": 0.5, "sia_weight": 1.0}},
        "ray": {"num_cpus": None},
    }
    assert data["pretrain"]["loss"]["sta_weight"] == 1.0  # a copy: the input is unchanged


@pytest.mark.parametrize("key", ["pretrain.loss.sta_weight", "pretrain.loss.sia_weight"])
def test_a_loss_weight_reruns_pretrain_and_no_stage_before_it(key):
    """`dvc exp run -S KEY=...` re-runs the stages whose params hold KEY (and their
    dependants): pre-training, never ingest, reports or similarity."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def holds(stage: str) -> bool:
        declared = [p for p in stages[stage].get("params", []) if isinstance(p, str)]
        return any(key == p or key.startswith(f"{p}.") for p in declared)

    assert holds("pretrain")
    assert not any(holds(stage) for stage in ("ingest", "reports", "similarity"))


def test_lr_scales_name_the_model_parts_and_group_their_parameters():
    from typing import get_args

    from components.platform.config import ModelPart
    from components.stages.pretrain import parameter_groups
    from sista_core import SISTAModel
    from sista_core.config import SISTAConfig

    config = SISTAConfig.from_dict(
        {"image": {"name": "vit_tiny_patch16_224", "img_size": 32}, "embed_dim": 16}
    )
    model = SISTAModel(config)
    with_parameters = {n for n, m in model.named_children() if any(True for _ in m.parameters())}
    assert set(get_args(ModelPart)) == with_parameters

    groups = parameter_groups(model, {"text_encoder": 0.1, "image_global_proj": 2.0})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            part = name.split(".")[0]
            expected = {"text_encoder": 0.1, "image_global_proj": 2.0}.get(part, 1.0)
            assert scale_of[id(parameter)] == expected, name


def test_the_documented_ablation_command_sets_valid_params(tmp_path):
    """docs/results.md's six-way ablation, `dvc exp run -S ...`: DVC's own override parser
    applied to params.yaml gives a config that validates, with each part switched off."""
    import re
    import shlex
    import shutil

    from dvc.utils.hydra import apply_overrides

    text = (ROOT / "docs" / "results.md").read_text()
    command = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "+pretrain" in b)
    words = shlex.split(command.replace("\\\n", " "))
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", overrides)
    params = load_params(tmp_path / "params.yaml")
    variant = params.pretrain.model_config_for
    assert variant("sia_none").sia.mode == "none"
    assert variant("sia_positive").sia.mode == "positive"
    assert variant("sia_soft").sia.mode == "soft"
    assert variant("intra_off").loss.intra_weight == 0
    assert variant("sta_off").loss.sta_weight == 0
    assert variant("dense").sta.sparse == "softmax"
    assert set(params.evaluate.inits) == {"sista", "random", *params.pretrain.baselines}
