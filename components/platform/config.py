"""``params.yaml``: the single source of truth, validated before any work starts.

One pydantic section per stage; unknown keys and out-of-range values are errors that name
the dotted key (``pretrain.optim.lr: Input should be greater than 0``). The sections hold
types and ranges; the values of the settings the base ``params.yaml`` lists are written there
only, and a key missing from a params file takes the base's value (:class:`Params`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sista_core.config import SISTAConfig

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
PRETRAIN_SET = "pretrain"  # the pre-training pairs' own name: retrieval is scored on them


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageSection(Section):
    uri: str  # a local folder (relative to the repo) or s3://bucket/prefix
    endpoint_url: str | None  # S3-compatible endpoint (MinIO, moto); None = AWS
    # With an s3:// uri, the local copy of the stage folders a process reads and writes
    # (what DVC tracks; on a cluster node, its cache). Unused for a local uri.
    local_dir: str


class RaySection(Section):
    address: str | None  # None: local Ray; http://head:8265 submits jobs
    num_cpus: int | None = Field(ge=1)


class MLflowSection(Section):
    tracking_uri: str  # MLFLOW_TRACKING_URI overrides
    artifact_root: str
    experiment_prefix: str
    registered_model: str


class PretrainSetSection(Section):
    max_reports: int | None = Field(ge=8)  # None: every report of the source
    val_fraction: Fraction


# What each downstream set's adapter can be scored on (``evaluate.tasks`` is checked against
# it): the labels it carries, and whether it has masks (segmentation) and boxes (detection).
SET_TASKS: dict[str, tuple[str, ...]] = {
    "chexpert": ("classification", "zero_shot"),
    "rsna_pneumonia": ("classification", "segmentation", "detection"),
    "covidx": ("classification",),
    "siim_acr": ("classification", "segmentation"),
    "object_cxr": ("classification", "segmentation", "detection"),
    "phantom_classification": ("classification", "zero_shot"),
    "phantom_pneumothorax": ("segmentation",),
    "phantom_opacity": ("segmentation", "detection"),
}
# CheXpert's uncertain labels per competition finding (MGCA's preprocessing: U-Ones where
# the uncertain mentions are mostly positive, U-Zeros elsewhere).
MGCA_UNCERTAIN: dict[str, str] = {
    "Atelectasis": "ones",
    "Cardiomegaly": "zeros",
    "Consolidation": "zeros",
    "Edema": "ones",
    "Pleural Effusion": "ones",
}


class SetSection(Section):
    """One downstream set: ``adapter`` reads ``path`` (a folder in the adapter's upstream
    layout, local or s3://) with its protocol's split. Fractions are of patients."""

    adapter: str
    path: str | None = None


class PhantomSetSection(SetSection):
    """Embedded phantoms (real labels, masks or boxes placed on synthetic radiographs)."""

    adapter: Literal["phantom_classification", "phantom_pneumothorax", "phantom_opacity"]
    patients: int = Field(1000, ge=20)
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.25

    @model_validator(mode="after")
    def _no_path(self) -> PhantomSetSection:
        if self.path:
            raise ValueError(f"{self.adapter} is rendered, it reads no path")
        return self


class CheXpertSetSection(SetSection):
    """CheXpert-v1.0(-small): the official ``valid.csv`` is the test split, ``val_images``
    training images (whole patients) the validation split; ``protocol: 5x200`` is instead
    the zero-shot set: ``per_finding`` training images for each competition finding where it
    alone is positive (held out of the ``official`` set's training images too)."""

    adapter: Literal["chexpert"]
    path: str
    protocol: Literal["official", "5x200"] = "official"
    uncertain: dict[
        Literal["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"],
        Literal["ones", "zeros"],
    ] = Field(default_factory=lambda: dict(MGCA_UNCERTAIN))
    val_images: int = Field(5000, ge=1)
    per_finding: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _every_finding_has_a_policy(self) -> CheXpertSetSection:
        missing = sorted(set(MGCA_UNCERTAIN) - set(self.uncertain))
        if missing:
            raise ValueError(f"uncertain: no policy (ones or zeros) for {', '.join(missing)}")
        return self


class RsnaSetSection(SetSection):
    """RSNA Pneumonia (stage 2 training images): random patient split."""

    adapter: Literal["rsna_pneumonia"]
    path: str
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.15


class SiimSetSection(SetSection):
    """SIIM-ACR Pneumothorax: random patient split; ``balance_train`` keeps as many negative
    as positive training images (MGCA's segmentation training set)."""

    adapter: Literal["siim_acr"]
    path: str
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.15
    balance_train: bool = True


class CovidxSetSection(SetSection):
    """COVIDx CXR: the official ``test.txt`` is the test split; ``val_fraction`` of the
    training patients validate. One class per image (softmax probe, accuracy)."""

    adapter: Literal["covidx"]
    path: str
    classes: tuple[str, ...] = ("normal", "pneumonia", "COVID-19")
    val_fraction: Fraction = 0.2


class ObjectCxrSetSection(SetSection):
    """Object-CXR: the official dev set is the test split; ``val_fraction`` of train validates."""

    adapter: Literal["object_cxr"]
    path: str
    val_fraction: Fraction = 0.1


DownstreamSet = Annotated[
    PhantomSetSection
    | CheXpertSetSection
    | RsnaSetSection
    | SiimSetSection
    | CovidxSetSection
    | ObjectCxrSetSection,
    Field(discriminator="adapter"),
]


class DownstreamSetsSection(Section):
    label_fractions: tuple[Fraction, ...]
    seeds: tuple[int, ...]
    sets: dict[str, DownstreamSet]

    @model_validator(mode="after")
    def _set_names(self) -> DownstreamSetsSection:
        for name in self.sets:
            if name == PRETRAIN_SET or not name.replace("_", "").isalnum():
                raise ValueError(
                    f"sets: {name!r} is not a usable set name (letters, digits and _; "
                    f"{PRETRAIN_SET!r} is the pre-training set)"
                )
        return self


class IngestSection(Section):
    source: Literal["embedded", "openi", "mimic_cxr"]
    source_path: str | None  # required for real sources
    image_size: int = Field(ge=32, le=1024)
    seed: int
    shard_size: int = Field(ge=1)
    max_quarantine_fraction: Annotated[float, Field(ge=0, le=1)]
    pretrain: PretrainSetSection
    downstream: DownstreamSetsSection

    @model_validator(mode="after")
    def _real_sources_need_a_path(self) -> IngestSection:
        if self.source != "embedded" and not self.source_path:
            raise ValueError(f"ingest.source_path is required for source {self.source!r}")
        return self


class ReportsSection(Section):
    max_length: int = Field(ge=8, le=512)  # text encoder tokens kept per report


class SimilaritySection(Section):
    encoder: str | None  # None: the packaged all-MiniLM-L6-v2
    batch_size: int = Field(ge=1)
    num_actors: int = Field(ge=1)
    top_k: int = Field(ge=1)
    block_size: int = Field(ge=64)
    thresholds: tuple[Annotated[float, Field(ge=-1, le=1)], ...]


class ImageModelSection(Section):
    name: str
    img_size: int = Field(ge=32)
    pretrained: bool
    checkpoint: str | None


class TextModelSection(Section):
    name_or_path: str | None
    max_length: int = Field(64, ge=8, le=512)
    freeze_layers: int = Field(ge=-1)


class SIASection(Section):
    mode: Literal["eliminate", "positive", "soft", "none"]
    threshold: float = Field(ge=-1)  # above 1 flags nothing: plain InfoNCE
    temperature: PositiveFloat
    alpha: Annotated[float, Field(ge=0, le=1)]
    sigma: PositiveFloat


class STASection(Section):
    sparse: Literal["sparsemax", "entmax15", "topk", "softmax"]
    topk: int = Field(ge=1)
    temperature_attn: PositiveFloat
    temperature_local: PositiveFloat


class LossSection(Section):
    sia_weight: Annotated[float, Field(ge=0)]
    sta_weight: Annotated[float, Field(ge=0)]
    intra_weight: Annotated[float, Field(ge=0)]


# SISTAModel's parts with parameters, the keys of ``optim.lr_scales``.
ModelPart = Literal[
    "image_encoder",
    "text_encoder",
    "image_global_proj",
    "text_global_proj",
    "image_local_proj",
    "text_local_proj",
]


class OptimSection(Section):
    lr: PositiveFloat
    # Learning-rate multipliers per model part (the others: 1), e.g. {text_encoder: 0.1}.
    lr_scales: dict[ModelPart, PositiveFloat]
    weight_decay: Annotated[float, Field(ge=0)]
    warmup_steps: int = Field(ge=0)
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] | None = None  # set: replaces steps
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=2)  # per worker
    # Cut every epoch after this many steps: smoke runs and benchmarks, not training.
    max_steps_per_epoch: int | None = Field(None, ge=1)


class GPUSection(Section):
    """Options that apply only where the workers have a GPU (``use_gpu``)."""

    bf16: bool = True  # autocast the forward pass to bfloat16
    channels_last: bool = True  # NHWC memory for convolutional backbones (ResNets)
    compile: bool = False  # torch.compile both encoders (minutes of compiling first)


class PretrainSection(Section):
    image: ImageModelSection
    text: TextModelSection
    embed_dim: int = Field(ge=8)
    sia: SIASection
    sta: STASection
    loss: LossSection
    optim: OptimSection
    semantics: Literal["embedding", "labels"]
    workers: int = Field(ge=1)
    cpus_per_worker: PositiveFloat
    # Ray placement group strategy of the workers; STRICT_SPREAD puts each on its own node.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
    use_gpu: bool
    gpu: GPUSection = GPUSection()
    max_failures: int = Field(ge=0)
    seed: int
    # Baselines pre-train through the same code: each is a partial override of this section.
    baselines: dict[str, dict[str, Any]]

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


# Downstream tasks: trained ones are cells of set x init x label fraction x seed; language
# ones need no labels. The evaluate stage reads these names from here.
TrainedTask = Literal["classification", "segmentation", "detection"]
LanguageTask = Literal["zero_shot", "retrieval"]
TRAINED_TASKS: tuple[str, ...] = get_args(TrainedTask)
LANGUAGE_TASKS: tuple[str, ...] = get_args(LanguageTask)
Task = Literal[TrainedTask, LanguageTask]  # one flat Literal: one error for a typo


class EvaluateSection(Section):
    # task -> the sets (ingest.downstream.sets names) it is scored on
    tasks: dict[Task, tuple[str, ...]]
    # "sista", "random" (the image encoder's own initialisation) or a pretrain.baselines name
    inits: tuple[str, ...]
    probe_epochs: int = Field(ge=1)
    probe_lr: PositiveFloat
    probe_weight_decay: Annotated[float, Field(ge=0)]
    # Segmentation and detection heads on cached frozen features: about head_steps updates
    # for every label fraction (epochs scale with the subset's size).
    head_steps: int = Field(ge=1)
    head_lr: PositiveFloat
    head_batch_size: int = Field(ge=1)
    head_width: int = Field(ge=1)  # decoder / detector channels
    pyramid_levels: int = Field(ge=1)
    # Segmentation and detection: false trains heads on the frozen encoder's cached features;
    # true fine-tunes a copy of the encoder with each head (encoder_lr), MGCA's protocol.
    finetune: bool
    encoder_lr: PositiveFloat
    # one_stage: our anchor-free head; fcos: torchvision's FCOS + FPN on the same features
    detector: Literal["one_stage", "fcos"]
    localisation_images: int = Field(ge=0)  # STA heat-map check; 0 skips it
    cpus_per_trial: PositiveFloat
    threads_per_trial: int = Field(ge=1)  # torch threads of one cell
    # GPU cells: each requests gpus_per_trial of a GPU (4 cells share one at 0.25).
    use_gpu: bool
    gpus_per_trial: Annotated[float, Field(gt=0, le=1)]

    @model_validator(mode="after")
    def _trained_tasks_exist(self) -> EvaluateSection:
        if not any(self.tasks.get(t) for t in TRAINED_TASKS):
            raise ValueError(f"evaluate.tasks needs at least one of {', '.join(TRAINED_TASKS)}")
        for task, sets in self.tasks.items():
            if task == "retrieval" and set(sets) - {PRETRAIN_SET}:
                raise ValueError(f"tasks.retrieval: only [{PRETRAIN_SET}] (the held-out pairs)")
        return self

    def cells(self) -> list[tuple[str, str]]:
        """(task, set) of every trained task, in task order."""
        return [(t, name) for t in TRAINED_TASKS for name in self.tasks.get(t, ())]


class PublishSection(Section):
    # task/set/metric@label fraction: SISTA's mean test score the registry compares; None:
    # the first trained task's first set, its first metric, at the smallest label fraction.
    metric: str | None
    higher_is_better: bool
    # bootstrap: promote only when the candidate beats the champion beyond the 95 % paired
    # bootstrap interval over the same test images; strict: on any strict improvement.
    gate: Literal["bootstrap", "strict"]

    @model_validator(mode="after")
    def _metric_shape(self) -> PublishSection:
        parts = (self.metric or "").partition("@")
        if self.metric is not None and (parts[0].count("/") != 2 or not parts[2]):
            raise ValueError(f"metric {self.metric!r}: expected task/set/metric@fraction")
        return self


class RetrainSection(Section):
    """What a scheduled run does when only the data changed since the last finished run
    (same params, same code): ``champion`` pre-trains SISTA for ``epochs`` more epochs from
    the @champion's weights; ``scratch`` runs the whole pipeline as the first time did.
    ``baselines``: pre-train the baselines again too (from scratch), else evaluation keeps
    the last run's baselines."""

    start: Literal["champion", "scratch"]
    epochs: int = Field(ge=1)
    baselines: bool


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


class SweepSection(Section):
    """``sista sweep``: Ray Tune over pre-training settings, ASHA on a validation signal."""

    # Dotted params.yaml keys under pretrain (what `dvc exp run -S` takes) -> distribution.
    space: dict[str, Distribution]
    trials: int = Field(ge=1)  # sampled settings, searched with ASHA
    # params.yaml's own values are trained to the end once per pre-training seed here, never
    # stopped early: the baseline and its spread over seeds, which a sampled trial must exceed
    # to replace the defaults. Empty: no baseline, the best completed trial wins.
    current_seeds: tuple[int, ...]
    noise_sds: float = Field(ge=0)  # the margin: this many standard deviations over seeds
    # probe_auroc: mean validation macro AUROC of linear probes trained on the label subsets
    # of ``probe_fractions`` (every ingest seed); retrieval: image-to-report recall@5 on the
    # held-out pre-training pairs.
    signal: Literal["probe_auroc", "retrieval"]
    probe_fractions: tuple[Fraction, ...]
    report_every: int = Field(ge=1)  # steps between validation reports: ASHA's rungs
    epochs: int | None = Field(ge=1)  # None: pretrain.optim.epochs, as the pipeline
    reduction_factor: int = Field(ge=2)  # ASHA keeps the best 1/rf at each rung
    max_concurrent: int = Field(ge=1)
    cpus_per_trial: PositiveFloat  # the trial's driver (Ray Train's controller)
    cpus_per_worker: PositiveFloat  # each pre-training worker of a trial
    seed: int

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
    storage: StorageSection
    ray: RaySection
    mlflow: MLflowSection
    ingest: IngestSection
    reports: ReportsSection
    similarity: SimilaritySection
    pretrain: PretrainSection
    evaluate: EvaluateSection
    publish: PublishSection
    retrain: RetrainSection
    sweep: SweepSection

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_the_base(cls, data: Any) -> Any:
        """A key missing from the given settings takes the base params file's value (the one
        place a default is written). The token length is set once, as
        ``reports.max_length``: pre-training's text encoder takes it from there unless
        ``pretrain.text.max_length`` is given."""
        if not isinstance(data, dict):
            return data
        data = profile_merge(base_data(), data)
        reports, pretrain = data.get("reports", {}), data.get("pretrain", {})
        if not (isinstance(reports, dict) and isinstance(pretrain, dict)):
            return data
        text = pretrain.get("text", {})
        if not isinstance(text, dict) or "max_length" in text or "max_length" not in reports:
            return data
        length = reports["max_length"]
        return {**data, "pretrain": {**pretrain, "text": {**text, "max_length": length}}}

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
    def _inits_are_trained(self) -> Params:
        """Every init evaluate scores is pre-trained by the pretrain stage (or is random)."""
        known = ["sista", *self.pretrain.baselines, "random"]
        unknown = [name for name in self.evaluate.inits if name not in known]
        if unknown:
            raise ValueError(
                f"evaluate.inits: {', '.join(map(repr, unknown))} is neither sista, random nor "
                f"a pretrain.baselines name (known: {', '.join(known)})"
            )
        if len(set(self.evaluate.inits)) != len(self.evaluate.inits):
            raise ValueError(f"evaluate.inits lists a name twice: {list(self.evaluate.inits)}")
        return self

    @model_validator(mode="after")
    def _tasks_name_sets_that_serve_them(self) -> Params:
        """Every set a task names is defined and can be scored on that task."""
        sets = self.ingest.downstream.sets
        for task, names in self.evaluate.tasks.items():
            for name in names:
                if name == PRETRAIN_SET and task == "retrieval":
                    continue
                if name not in sets:
                    known = ", ".join(sorted(sets)) or "none"
                    raise ValueError(
                        f"evaluate.tasks.{task}: no set {name!r} in ingest.downstream.sets "
                        f"(defined: {known})"
                    )
                adapter = sets[name].adapter
                if task not in SET_TASKS[adapter]:
                    raise ValueError(
                        f"evaluate.tasks.{task}: set {name!r} ({adapter}) cannot serve "
                        f"{task}; it serves {', '.join(SET_TASKS[adapter])}"
                    )
        chosen = self.publish_metric()
        task, name, _, fraction = self.publish_cell()
        if name not in self.evaluate.tasks.get(task, ()):
            raise ValueError(
                f"publish.metric {chosen!r}: evaluate.tasks.{task} has no set {name!r}"
            )
        if task in TRAINED_TASKS and fraction not in self.ingest.downstream.label_fractions:
            raise ValueError(
                f"publish.metric {chosen!r}: {fraction:g} is not one of "
                "ingest.downstream.label_fractions"
            )
        return self

    def publish_metric(self) -> str:
        """``publish.metric``, or its default: the first trained (task, set)'s first metric
        (accuracy for a single-label set) at the smallest label fraction."""
        if self.publish.metric:
            return self.publish.metric
        task, name = self.evaluate.cells()[0]
        adapter = self.ingest.downstream.sets[name].adapter
        metric = {"classification": "auroc", "segmentation": "dice", "detection": "map_40_75"}[task]
        if task == "classification" and adapter == "covidx":
            metric = "accuracy"
        return f"{task}/{name}/{metric}@{min(self.ingest.downstream.label_fractions):g}"

    def publish_cell(self) -> tuple[str, str, str, float]:
        """:meth:`publish_metric` as (task, set, metric, label fraction)."""
        where, fraction = self.publish_metric().split("@")
        task, dataset, metric = where.split("/")
        return task, dataset, metric, float(fraction)

    @model_validator(mode="after")
    def _the_gate_can_compare(self) -> Params:
        """The bootstrap gate resamples SISTA's test outputs of the publish cell (a trained
        cell: checked above): its metric must be one the paired bootstrap knows."""
        if self.publish.gate != "bootstrap":
            return self
        task, _, metric, _ = self.publish_cell()
        resampled = {"classification": ("auroc", "accuracy"), "segmentation": ("dice",)}
        if metric not in resampled.get(task, ()):
            raise ValueError(
                f"publish.metric {self.publish_metric()!r}: publish.gate bootstrap resamples "
                f"macro AUROC, accuracy or Dice, not {task} {metric}; choose one of those or "
                f"publish.gate: strict"
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


ROOT = Path(__file__).resolve().parents[2]
SAVED_BASE = "params.base.yaml"  # the base while params.yaml holds another profile


def base_path(root: Path | None = None) -> Path:
    """The base params file: every setting's default, written once."""
    folder = root or ROOT
    saved = folder / SAVED_BASE
    return saved if saved.is_file() else folder / "params.yaml"


def base_data() -> dict[str, Any]:
    """The base params file's mapping: the repository's, else the working folder's (code
    installed apart from it, as in the image). Empty where there is neither: a params file
    given there must list every setting."""
    for path in (base_path(), base_path(Path.cwd())):
        if path.is_file():
            return _read_base(str(path), path.stat().st_mtime_ns)
    return {}


@functools.lru_cache(maxsize=4)
def _read_base(path: str, mtime_ns: int) -> dict[str, Any]:
    return params_mapping(Path(path).read_text(), source=path)


class ConfigError(ValueError):
    """params.yaml is invalid; the message names the file and the dotted key."""


class StageStopped(RuntimeError):
    """The stage stopped for a reason its message states in one line (exit status 1)."""


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def profile_merge(base: dict, overlay: dict, kind: type[Section] | None = None) -> dict:
    """``base`` with a profile's ``overlay``: a settings section (fixed keys) is merged key by
    key; a collection of named entries (downstream sets, evaluation tasks, baselines, the sweep
    space) is replaced whole, so a profile lists exactly its own."""
    kind = kind or Params
    merged = dict(base)
    for key, value in overlay.items():
        section = section_of(kind, key)
        if section and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = profile_merge(merged[key], value, section)
        else:
            merged[key] = value
    return merged


def section_of(kind: type[Section], key: str) -> type[Section] | None:
    """The settings section ``kind.key`` is (None: a value or a collection of named entries)."""
    field = kind.model_fields.get(key)
    annotation = field.annotation if field else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


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
    return params_from_text(path.read_text(), source=str(path), overrides=overrides)


def params_mapping(text: str, source: str) -> dict[str, Any]:
    """A params file's text as its mapping of sections (not yet validated)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of stage sections")
    return data


def params_from_text(text: str, source: str, overrides: dict | None = None) -> Params:
    """Validate a params file's text (before it is written anywhere); errors name ``source``."""
    data = params_mapping(text, source)
    if overrides:
        data = _deep_merge(data, overrides)
    return _validate(Params, data, source=source)


def tracking_uri(params: Params) -> str:
    """MLflow tracking URI: ``MLFLOW_TRACKING_URI`` wins over params (a server in production).
    A relative SQLite path is made absolute, so Ray workers in other folders find the store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri
