"""``params.yaml``: the single source of truth, validated before any work starts.

One pydantic section per stage; unknown keys and out-of-range values are errors that name
the dotted key (``pretrain.optim.lr: Input should be greater than 0``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sista_core.config import SISTAConfig

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageSection(Section):
    uri: str = "data"  # a local folder (relative to the repo) or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, moto); None = AWS
    # With an s3:// uri, the local copy of the stage folders a process reads and writes
    # (what DVC tracks; on a cluster node, its cache). Unused for a local uri.
    local_dir: str = "data"


class RaySection(Section):
    address: str | None = None  # None: local Ray; http://head:8265 submits jobs
    num_cpus: int | None = Field(None, ge=1)


class MLflowSection(Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides
    artifact_root: str = "mlartifacts"
    experiment_prefix: str = "sista"
    registered_model: str = "sista-encoder"


class PretrainSetSection(Section):
    max_reports: int | None = Field(None, ge=8)  # None: every report of the source
    val_fraction: Fraction = 0.05


class DownstreamSetSection(Section):
    num_patients: int = Field(3000, ge=50)
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.25
    label_fractions: tuple[Fraction, ...] = (0.01, 0.1, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    # Segmentation (pneumothorax) and detection (opacity boxes) sets: phantoms placed by real
    # SIIM / RSNA annotations, or the real datasets' folders when a path is given; 0 skips.
    segmentation_patients: int = Field(1000, ge=0)
    detection_patients: int = Field(1000, ge=0)
    segmentation_path: str | None = None
    detection_path: str | None = None


class IngestSection(Section):
    source: Literal["embedded", "openi", "mimic_cxr"] = "embedded"
    source_path: str | None = None  # required for real sources
    image_size: int = Field(128, ge=32, le=1024)
    seed: int = 0
    shard_size: int = Field(1024, ge=1)
    max_quarantine_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05
    pretrain: PretrainSetSection = PretrainSetSection()
    downstream: DownstreamSetSection = DownstreamSetSection()

    @model_validator(mode="after")
    def _real_sources_need_a_path(self) -> IngestSection:
        if self.source != "embedded" and not self.source_path:
            raise ValueError(f"ingest.source_path is required for source {self.source!r}")
        return self


class ReportsSection(Section):
    max_length: int = Field(128, ge=8, le=512)  # text encoder tokens kept per report


class SimilaritySection(Section):
    encoder: str | None = None  # None: the packaged all-MiniLM-L6-v2
    batch_size: int = Field(128, ge=1)
    num_actors: int = Field(1, ge=1)
    top_k: int = Field(32, ge=1)
    block_size: int = Field(4096, ge=64)
    thresholds: tuple[Annotated[float, Field(ge=-1, le=1)], ...] = (0.8, 0.85, 0.9, 0.95)


class ImageModelSection(Section):
    name: str = "vit_tiny_patch16_224"
    img_size: int = Field(128, ge=32)
    pretrained: bool = False
    checkpoint: str | None = None


class TextModelSection(Section):
    name_or_path: str | None = None
    max_length: int = Field(128, ge=8, le=512)
    freeze_layers: int = Field(0, ge=-1)


class SIASection(Section):
    mode: Literal["eliminate", "positive", "soft", "none"] = "eliminate"
    threshold: float = Field(0.9, ge=-1)  # above 1 flags nothing: plain InfoNCE
    temperature: PositiveFloat = 0.07
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    sigma: PositiveFloat = 0.1


class STASection(Section):
    sparse: Literal["sparsemax", "entmax15", "topk", "softmax"] = "sparsemax"
    topk: int = Field(8, ge=1)
    temperature_attn: PositiveFloat = 0.1
    temperature_local: PositiveFloat = 0.1


class LossSection(Section):
    sia_weight: Annotated[float, Field(ge=0)] = 1.0
    sta_weight: Annotated[float, Field(ge=0)] = 1.0
    intra_weight: Annotated[float, Field(ge=0)] = 0.5


class OptimSection(Section):
    lr: PositiveFloat = 3e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    warmup_steps: int = Field(20, ge=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=2)  # per worker


class GPUSection(Section):
    """Options that apply only where the workers have a GPU (``use_gpu``)."""

    bf16: bool = True  # autocast the forward pass to bfloat16
    channels_last: bool = True  # NHWC memory for convolutional backbones (ResNets)
    compile: bool = False  # torch.compile both encoders (minutes of compiling first)


class PretrainSection(Section):
    image: ImageModelSection = ImageModelSection()
    text: TextModelSection = TextModelSection()
    embed_dim: int = Field(128, ge=8)
    sia: SIASection = SIASection()
    sta: STASection = STASection()
    loss: LossSection = LossSection()
    optim: OptimSection = OptimSection()
    semantics: Literal["embedding", "labels"] = "embedding"
    workers: int = Field(2, ge=1)
    cpus_per_worker: PositiveFloat = 1.0
    # Ray placement group strategy of the workers; STRICT_SPREAD puts each on its own node.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    use_gpu: bool = False
    gpu: GPUSection = GPUSection()
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    # Baselines pre-train through the same code: each is a partial override of this section.
    baselines: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {
            "convirt": {"sia": {"mode": "none"}, "loss": {"sta_weight": 0, "intra_weight": 0}},
            "dense": {"sta": {"sparse": "softmax"}},
        }
    )

    def model_config_for(self, variant: str = "sista") -> SISTAConfig:
        """The library config of the SISTA run or of a named baseline."""
        section = self.variant(variant)
        return SISTAConfig.from_dict(
            section.model_dump(include={"image", "text", "embed_dim", "sia", "sta", "loss"})
        )

    def variant(self, name: str) -> PretrainSection:
        """This section with a baseline's overrides applied (``sista`` is the section itself)."""
        if name == "sista":
            return self
        if name not in self.baselines:
            raise ConfigError(
                f"pretrain.baselines has no {name!r}; known: {sorted(self.baselines)}"
            )
        return self.with_overrides(self.baselines[name])

    def with_overrides(self, overrides: dict[str, Any]) -> PretrainSection:
        """This section with nested ``overrides`` applied, validated (a baseline, a trial)."""
        return _validate(PretrainSection, _deep_merge(self.model_dump(), overrides), "pretrain")


# Downstream tasks: trained ones are cells of init x label fraction x seed; language ones need
# no labels. The evaluate stage reads these names from here.
TrainedTask = Literal["classification", "segmentation", "opacity_segmentation", "detection"]
LanguageTask = Literal["zero_shot", "retrieval"]
TRAINED_TASKS: tuple[str, ...] = get_args(TrainedTask)
LANGUAGE_TASKS: tuple[str, ...] = get_args(LanguageTask)
Task = Literal[TrainedTask, LanguageTask]  # one flat Literal: one error for a typo


class EvaluateSection(Section):
    tasks: tuple[Task, ...] = TRAINED_TASKS + LANGUAGE_TASKS
    inits: tuple[Literal["sista", "convirt", "dense", "random"], ...] = (
        "sista",
        "convirt",
        "dense",
        "random",
    )
    probe_epochs: int = Field(200, ge=1)
    probe_lr: PositiveFloat = 1e-2
    probe_weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    # Segmentation and detection heads on cached frozen features: about head_steps updates
    # for every label fraction (epochs scale with the subset's size).
    head_steps: int = Field(50, ge=1)
    head_lr: PositiveFloat = 3e-3
    head_batch_size: int = Field(16, ge=1)
    head_width: int = Field(16, ge=1)  # decoder / detector channels
    pyramid_levels: int = Field(4, ge=1)
    # Segmentation and detection: false trains heads on the frozen encoder's cached features;
    # true fine-tunes a copy of the encoder with each head (encoder_lr), MGCA's protocol.
    finetune: bool = False
    encoder_lr: PositiveFloat = 1e-4
    localisation_images: int = Field(100, ge=0)  # STA heat-map check; 0 skips it
    cpus_per_trial: PositiveFloat = 1.0  # a cell trains on one thread

    @model_validator(mode="after")
    def _trained_tasks_exist(self) -> EvaluateSection:
        if not any(t in self.tasks for t in TRAINED_TASKS):
            raise ValueError(f"evaluate.tasks needs at least one of {', '.join(TRAINED_TASKS)}")
        return self


class PublishSection(Section):
    metric: str = "classification/auroc@0.01"
    higher_is_better: bool = True


class Distribution(Section):
    """One swept number: exactly one of ``choice: [a, b, ...]``, ``uniform: [low, high]`` or
    ``loguniform: [low, high]`` (low > 0)."""

    choice: tuple[float, ...] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[PositiveFloat, PositiveFloat] | None = None
    q: PositiveFloat | None = None  # uniform/loguniform: round samples to multiples of q

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> Distribution:
        kinds = [k for k in ("choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform")
        if self.q is not None and self.choice is not None:
            raise ValueError("q rounds uniform or loguniform samples, not a choice")
        bounds = self.uniform or self.loguniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{kinds[0]}: low must be below high, got {list(bounds)}")
        return self

    def extremes(self) -> tuple[float, ...]:
        """The values a sample can take at the edges (every value of a choice)."""
        return self.choice or self.uniform or self.loguniform  # type: ignore[return-value]


def _default_space() -> dict[str, Distribution]:
    return {
        "pretrain.loss.sia_weight": Distribution(loguniform=(0.25, 2.0), q=0.05),
        "pretrain.loss.sta_weight": Distribution(loguniform=(0.25, 2.0), q=0.05),
        "pretrain.loss.intra_weight": Distribution(uniform=(0.0, 1.0), q=0.05),
        "pretrain.sia.threshold": Distribution(choice=(0.8, 0.85, 0.9, 0.95)),
        "pretrain.sia.temperature": Distribution(loguniform=(0.03, 0.2), q=0.005),
        "pretrain.sta.temperature_attn": Distribution(loguniform=(0.05, 0.3), q=0.01),
    }


class SweepSection(Section):
    """``sista sweep``: Ray Tune over pre-training settings, ASHA on a validation signal."""

    # Dotted params.yaml keys under pretrain (what `dvc exp run -S` takes) -> distribution.
    space: dict[str, Distribution] = Field(default_factory=_default_space)
    trials: int = Field(10, ge=1)
    include_current: bool = True  # the first trial is params.yaml's own values
    # probe_auroc: mean validation macro AUROC of linear probes trained on the label subsets
    # of ``probe_fractions`` (every ingest seed); retrieval: image-to-report recall@5 on the
    # held-out pre-training pairs.
    signal: Literal["probe_auroc", "retrieval"] = "probe_auroc"
    probe_fractions: tuple[Fraction, ...] = (0.01, 0.1)
    report_every: int = Field(15, ge=1)  # steps between validation reports: ASHA's rungs
    epochs: int | None = Field(None, ge=1)  # None: pretrain.optim.epochs, as the pipeline
    reduction_factor: int = Field(3, ge=2)  # ASHA keeps the best 1/rf at each rung
    max_concurrent: int = Field(1, ge=1)
    cpus_per_trial: PositiveFloat = 0.5  # the trial's driver (Ray Train's controller)
    cpus_per_worker: PositiveFloat = 0.75  # each pre-training worker of a trial
    seed: int = 0

    @model_validator(mode="after")
    def _space_names_pretrain_numbers(self) -> SweepSection:
        for key in self.space:
            _pretrain_number(key)
        return self


def _pretrain_number(dotted: str) -> None:
    """``pretrain.loss.sia_weight`` must name a number of the pretrain section."""
    section, *path = dotted.split(".")
    kind: Any = PretrainSection
    for depth, name in enumerate(path):
        if section != "pretrain":
            raise ValueError(f"space key {dotted!r}: only pretrain settings are swept")
        fields = getattr(kind, "model_fields", {})
        if name not in fields:
            where = ".".join([section, *path[:depth]])
            known = ", ".join(sorted(fields))
            raise ValueError(f"space key {dotted!r}: {where} has no {name!r} (known: {known})")
        kind = fields[name].annotation
    if not path or kind not in (float, int) and "float" not in str(kind):
        raise ValueError(f"space key {dotted!r} is not a number of the pretrain section")


class Params(Section):
    storage: StorageSection = StorageSection()
    ray: RaySection = RaySection()
    mlflow: MLflowSection = MLflowSection()
    ingest: IngestSection = IngestSection()
    reports: ReportsSection = ReportsSection()
    similarity: SimilaritySection = SimilaritySection()
    pretrain: PretrainSection = PretrainSection()
    evaluate: EvaluateSection = EvaluateSection()
    publish: PublishSection = PublishSection()
    sweep: SweepSection = SweepSection()

    @model_validator(mode="after")
    def _one_token_length(self) -> Params:
        """The reports stage tokenises for pre-training: both must keep the same length."""
        stored, trained = self.reports.max_length, self.pretrain.text.max_length
        if stored != trained:
            raise ValueError(
                f"reports.max_length ({stored}) must equal pretrain.text.max_length ({trained}): "
                "the reports stage stores the tokens pre-training reads"
            )
        return self

    @model_validator(mode="after")
    def _swept_values_are_valid_settings(self) -> Params:
        """Every edge of every swept range must itself be a valid pretrain setting."""
        for key, distribution in self.sweep.space.items():
            for value in distribution.extremes():
                overrides = nested({key.removeprefix("pretrain."): value})
                try:
                    PretrainSection.model_validate(
                        _deep_merge(self.pretrain.model_dump(), overrides)
                    )
                except ValidationError as error:
                    message = error.errors()[0]["msg"]
                    raise ValueError(f"sweep.space.{key}: {value} is invalid: {message}") from None
        return self


class ConfigError(ValueError):
    """params.yaml is invalid; the message names the file and the dotted key."""


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"loss.sia_weight": 1} -> {"loss": {"sia_weight": 1}}."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        branch = tree
        for name in parents:
            branch = branch.setdefault(name, {})
        branch[leaf] = value
    return tree


def with_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """``data`` with dotted-key values set, as ``dvc exp run -S a.b=v`` sets them:
    ``with_overrides({"a": {"b": 1}}, {"a.b": 2}) == {"a": {"b": 2}}``."""
    return _deep_merge(data, nested(overrides))


def _validate(kind: type[Section], data: Any, prefix: str = "", source: str = "params"):
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            key = ".".join(str(part) for part in (prefix, *problem["loc"]) if part != "")
            message = problem["msg"].replace("Extra inputs are not permitted", "unknown key")
            message = message.removeprefix("Value error, ")
            lines.append(f"{source}: {key}: {message}" if key else f"{source}: {message}")
        raise ConfigError("\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read and validate ``params.yaml`` (plus optional nested overrides)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage sections")
    if overrides:
        data = _deep_merge(data, overrides)
    return _validate(Params, data, source=str(path))


def tracking_uri(params: Params) -> str:
    """MLflow tracking URI: ``MLFLOW_TRACKING_URI`` wins over params (a server in production).
    A relative SQLite path is made absolute, so Ray workers in other folders find the store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri
