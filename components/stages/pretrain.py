"""Stage ``pretrain``: SISTA pre-training with Ray Train (``TorchTrainer``, DDP).

The training runner is separate from the library (open_clip's split): ``sista_core`` holds
the model and losses; this file holds the loop, checkpoints, resumption and tracking.
Baselines pre-train through the same code with overrides from ``pretrain.baselines``, in
the same process after SISTA (``--variant NAME`` trains one). ``--warm-start`` (a scheduled
run on new data, ``components.platform.lineage``) starts SISTA from the @champion's weights and
trains ``retrain.epochs`` epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402
from safetensors.torch import save_model  # noqa: E402

from components.platform import lineage, storage  # noqa: E402
from components.platform.config import Params, PretrainSection, StorageSection, tracking_uri  # noqa: E402
from components.platform.runtime import (  # noqa: E402
    ensure_ray,
    require_nodes,
    stop_when_nodes_are_lost,
    worker_placement,
)
from components.platform.stage import stage_main  # noqa: E402
from components.platform.stage_storage import (  # noqa: E402
    PRETRAIN_INPUTS,
    pull,
    ray_storage,
    stage_output,
)
from components.platform.tracking import (  # noqa: E402
    MetricLog,
    champion_version,
    last_logged_step,
    record_placement,
    stage_run,
)
from components.stages.pretrain_data import PretrainData  # noqa: E402
from sista_core import SISTAConfig, SISTAModel  # noqa: E402
from sista_core.checkpoint import load_safetensors_into, load_state_dict_file  # noqa: E402
from sista_core.cpu import retain_freed_memory  # noqa: E402
from sista_core.encoders.text import collate_tokens  # noqa: E402
from sista_core.losses import mean_over_workers  # noqa: E402
from sista_core.retrieval import recall_at_k  # noqa: E402
from sista_core.schedule import cosine_with_warmup  # noqa: E402

STEP_METRICS = (
    "loss",
    "loss_sia",
    "loss_sta",
    "loss_intra",
    "fraction_negatives_eliminated",
    "attention_nonzero_per_word",
)
STATE_FILE = "training_state.json"


def run_fingerprint(section: dict[str, Any]) -> str:
    """Short hash of the resolved pretrain config: the same config resumes the same run,
    a changed config starts a new one (never resumes stale weights)."""
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:10]


def save_training_state(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    save_model(model, str(folder / "model.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")  # tensors and numbers only
    (folder / STATE_FILE).write_text(json.dumps(state))


def load_training_state(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    load_safetensors_into(model, folder / "model.safetensors")
    if optimizer is not None:  # tensors and numbers only: nothing pickled is executed
        optimizer.load_state_dict(load_state_dict_file(folder / "optimizer.pt"))
    return json.loads((folder / STATE_FILE).read_text())


def load_initial_weights(model: torch.nn.Module, artifact_uri: str, tracking_uri: str) -> None:
    """The weights of a registered model folder (``model.safetensors``, the @champion's),
    downloaded from the artifact store on this worker's node and loaded strictly."""
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=folder, tracking_uri=tracking_uri
        )
        load_safetensors_into(model, Path(local) / "model.safetensors")


def parameter_groups(model: SISTAModel, lr_scales: dict[str, float]) -> list[dict[str, Any]]:
    """The trainable parameters in one optimiser group per model part named in
    ``lr_scales`` (a top-level submodule such as ``text_encoder``), each with its
    learning-rate multiplier ``lr_scale``, and one group of the rest at 1."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            part = name.split(".")[0]
            groups.setdefault(part if part in lr_scales else "", []).append(parameter)
    return [
        {"params": params, "lr_scale": lr_scales.get(part, 1.0)} for part, params in groups.items()
    ]


def retrieval_recall(
    model: SISTAModel, data: PretrainData, ks=(1, 5, 10), batch_size: int = 64
) -> dict[str, float]:
    """Recall@k on held-out pairs, a cheap validation signal: ``val_recall_at_{k}`` is
    image-to-report, ``val_text_to_image_recall_at_{k}`` report-to-image."""
    if len(data) < 2:
        return {}
    model.eval()
    image_embeds, text_embeds = [], []
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            images = torch.from_numpy(np.asarray(data.images[start : start + batch_size]))
            image_embeds.append(model.encode_image(model.image_encoder.normalize(images))["global"])
            tokens = collate_tokens(
                data.tokens[start : start + batch_size], model.text_encoder.tokenizer.pad_token_id
            )
            text_embeds.append(model.encode_text(tokens)["global"])
    recall = recall_at_k(torch.cat(image_embeds), torch.cat(text_embeds), ks)
    model.train()
    return {
        **{f"val_recall_at_{k}": recall[f"image_to_text_recall_at_{k}"] for k in ks},
        **{f"val_text_to_image_recall_at_{k}": recall[f"text_to_image_recall_at_{k}"] for k in ks},
    }


def accelerate(model: SISTAModel, bf16: bool, channels_last: bool, compile: bool) -> None:
    """The GPU path (bf16 autocast is applied around the forward pass by the caller):
    channels-last weights for convolutional backbones, and ``torch.compile`` of each
    encoder in place (``Module.compile`` keeps the state-dict keys, so checkpoints load
    anywhere)."""
    if channels_last:
        model.image_encoder.to(memory_format=torch.channels_last)
    if compile:
        model.image_encoder.compile()
        model.text_encoder.compile()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"])  # identical init everywhere; DDP also broadcasts
    torch.set_num_threads(config["threads_per_worker"])
    retain_freed_memory()  # large activations reuse their pages step after step
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    use_autocast = on_gpu and config["gpu"]["bf16"]

    placement = worker_placement()  # which node each rank runs on, for the run's record
    data_root = pull(StorageSection(**config["storage"]), PRETRAIN_INPUTS)  # this node's copy
    data = PretrainData(data_root, "train", config["semantics"], **config["text_states"])
    model = SISTAModel(SISTAConfig.from_dict(config["model"]))
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config["lr_scales"]),
        lr=config["lr"],
        weight_decay=config["weight_decay"],
    )
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if config.get("init_from") and not checkpoint:  # a resumed run has its own weights
        load_initial_weights(model, config["init_from"], config["tracking_uri"])
        if rank == 0:
            print(f"[pretrain] warm start from {config['init_from']}", flush=True)
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_training_state(Path(folder), model, optimizer)
        if rank == 0:
            done = f"epoch {state['epoch']}, step {state['step']}"
            print(f"[pretrain] resuming after {done}", flush=True)
    state["workers"] = placement
    core = model
    if on_gpu:
        accelerate(core, **config["gpu"])
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    pad_id = core.text_encoder.tokenizer.pad_token_id

    def to_device(tensor: torch.Tensor) -> torch.Tensor:
        """Page-locked host memory lets the copy overlap the GPU's work."""
        return tensor.pin_memory().to(device, non_blocking=True) if on_gpu else tensor

    steps_per_epoch = data.steps_per_epoch(config["batch_size"], world_size)
    if config.get("max_steps_per_epoch"):
        steps_per_epoch = min(steps_per_epoch, config["max_steps_per_epoch"])
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(data)} training pairs are fewer than one global batch "
            f"({config['batch_size']} x {world_size} workers)"
        )
    total_steps = config["epochs"] * steps_per_epoch
    client = mlflow.MlflowClient(config["tracking_uri"]) if rank == 0 else None
    # Rank 0's step metrics: sent as they come, kept while the server is away.
    tracker = MetricLog(client, config["mlflow_run_id"]) if client else None
    if rank == 0:
        source = "read from the similarity stage" if data.has_text_states else "run every step"
        print(f"[pretrain] frozen text layers: {source}", flush=True)
    # After a worker failure Ray restarts here from the last checkpoint: steps that the failed
    # attempt already logged are run again but not logged again.
    logged_up_to = (
        last_logged_step(client, config["mlflow_run_id"], ("loss", "epoch_loss")) if client else 0
    )
    validation = PretrainData(data_root, "val", config["semantics"]) if rank == 0 else None
    # A sweep (components/stages/sweep.py) reports every ``report_every`` steps too, with
    # ``scorer(model)``'s validation metrics from rank 0, for its early-stopping scheduler.
    report_every, scorer = config.get("report_every", 0), config.get("scorer")

    for epoch in range(state["epoch"], config["epochs"]):
        sums: dict[str, float] = {}
        tick = time.perf_counter()
        batches = data.batches(epoch, rank, world_size, config["batch_size"], config["seed"])
        for batch in itertools.islice(batches, steps_per_epoch):
            warmup = config["warmup_steps"]
            if config.get("warmup_fraction") is not None:  # a share of all steps (MGCA: 40 %)
                warmup = round(config["warmup_fraction"] * total_steps)
            lr = cosine_with_warmup(state["step"], total_steps, warmup, config["lr"])
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            # uint8 pixels cross to the device (a quarter of the float bytes), then normalise.
            images = core.image_encoder.normalize(to_device(torch.from_numpy(batch.images)))
            tokens = collate_tokens(batch.tokens, pad_id).to(device, non_blocking=on_gpu)
            semantics = to_device(torch.from_numpy(batch.semantics))
            if on_gpu and config["gpu"]["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            loaded = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                out = model(images, tokens, semantics)
            forward = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            backward = time.perf_counter()
            optimizer.step()
            stepped = time.perf_counter()
            state["step"] += 1
            # Means over the workers: each one's per-pair terms (STA) cover its own shard.
            logged = mean_over_workers(torch.stack([out[n].detach().float() for n in STEP_METRICS]))
            step_metrics = dict(zip(STEP_METRICS, logged.tolist(), strict=True))
            step_metrics.update(
                lr=lr,
                samples_per_s=config["batch_size"] * world_size / (stepped - tick),
                time_data_s=loaded - tick,
                time_forward_s=forward - loaded,
                time_backward_s=backward - forward,
                time_optimizer_s=stepped - backward,
            )
            for name, value in step_metrics.items():
                sums[name] = sums.get(name, 0.0) + value
            if tracker is not None and state["step"] % config["log_every"] == 0:
                if state["step"] > logged_up_to:
                    tracker.log(step_metrics, state["step"])
                state["history"].append({"step": state["step"], "epoch": epoch, **step_metrics})
            mid_epoch = state["step"] % steps_per_epoch != 0  # the epoch's end reports below
            if report_every and state["step"] % report_every == 0 and mid_epoch:
                scores = scorer(core) if scorer and rank == 0 else {}
                if tracker is not None and scores and state["step"] > logged_up_to:
                    tracker.log(scores, state["step"])
                ray.train.report({"step": state["step"], "epoch": epoch, **scores})
            tick = time.perf_counter()

        epoch_metrics = {f"epoch_{k}": v / steps_per_epoch for k, v in sums.items()}
        epoch_metrics.update(epoch=epoch + 1, step=state["step"])
        state["epoch"] = epoch + 1
        with tempfile.TemporaryDirectory() as folder:
            epoch_checkpoint = None
            if rank == 0:
                epoch_metrics.update(retrieval_recall(core, validation))
                epoch_metrics.update(scorer(core) if scorer else {})
                if state["step"] > logged_up_to:
                    tracker.log(epoch_metrics, state["step"])
                save_training_state(Path(folder), core, optimizer, state)
                epoch_checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(epoch_metrics, checkpoint=epoch_checkpoint)
    if tracker is not None:
        tracker.flush()  # the stage completes with every step's metrics on the server


def plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    steps = [h["step"] for h in history]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for name in ("loss", "loss_sia", "loss_sta", "loss_intra"):
        axes[0].plot(steps, [h[name] for h in history], label=name)
    axes[0].set_title("loss terms")
    axes[0].legend()
    axes[1].plot(steps, [h["fraction_negatives_eliminated"] for h in history])
    axes[1].set_title("fraction of negatives eliminated (SIA)")
    axes[2].plot(steps, [h["attention_nonzero_per_word"] for h in history])
    axes[2].set_title("patches per word with non-zero attention (STA)")
    for axis in axes:
        axis.set_xlabel("step")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """SISTA then every baseline of ``pretrain.baselines`` (or only ``--variant NAME``), one
    after the other in this process: one Ray start-up and one import of the stack serve
    all of them (each cost about half a minute per variant on 2 cores)."""
    requested = getattr(args, "variant", None) or "all"
    variants = ["sista", *params.pretrain.baselines] if requested == "all" else [requested]
    for variant in variants:
        params.pretrain.variant(variant)  # an unknown name fails before any training
    warm = None
    if getattr(args, "warm_start", False):
        if variants != ["sista"]:
            raise ValueError("--warm-start continues SISTA's @champion: use --variant sista")
        warm = champion_source(params)
    ensure_ray(params, dashboard=True)  # Ray Train's placement-group cleaner needs it
    return {variant: train_variant(params, variant, warm) for variant in variants}


def champion_source(params: Params) -> dict[str, str]:
    """The @champion version of the registered model and its model folder's artifact URI."""
    version = champion_version(params)
    if version is None:
        raise ValueError(
            f"--warm-start: registered model {params.mlflow.registered_model!r} has no "
            "@champion to start from; pre-train without it (from scratch) first"
        )
    return {"version": str(version.version), "source": version.source}


def train_variant(
    params: Params, variant: str, warm: dict[str, str] | None = None
) -> dict[str, Any]:
    """Pre-train one variant into ``<storage>/pretrain/<variant>`` with its own MLflow run;
    ``warm``: from these weights (:func:`champion_source`) for ``retrain.epochs`` epochs."""
    section = params.pretrain.variant(variant)
    epochs = params.retrain.epochs if warm is not None else section.optim.epochs
    if warm is not None:
        optim = section.optim.model_copy(update={"epochs": epochs})
        section = section.model_copy(update={"optim": optim})
    model_config = params.pretrain.model_config_for(variant)
    fingerprint = run_fingerprint(
        {
            "pretrain": section.model_dump(),
            "ingest": params.ingest.model_dump(),
            "similarity": params.similarity.model_dump(),
            "warm_start": warm,
        }
    )
    if section.placement_strategy == "STRICT_SPREAD":
        require_nodes(section.workers, "pretrain.placement_strategy STRICT_SPREAD")
    logged = {
        "pretrain": section.model_dump(exclude={"baselines"}),
        "variant": variant,
        "fingerprint": fingerprint,
        **({"warm_start_from": warm["version"]} if warm else {}),
    }
    with (
        stage_run(params, "pretrain", run_name=f"pretrain-{variant}", logged=logged) as run_,
        stage_output(
            params,
            f"pretrain/{variant}",
            {"mlflow_run_id": run_.info.run_id, "variant": variant, "fingerprint": fingerprint},
        ) as (out, extra),
    ):
        ray_run = f"pretrain-{variant}-{fingerprint}"  # the same settings resume this run
        trainer = build_trainer(
            params, section, run_.info.run_id, ray_run, init_from=warm["source"] if warm else None
        )
        with lost_nodes_stop(params, section, ray_run):
            result = trainer.fit()
        model = SISTAModel(model_config)
        with result.checkpoint.as_directory() as folder:
            state = load_training_state(Path(folder), model, optimizer=None)
        model.save_pretrained(out / "model")
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        history_keys = ("step", "epoch", *STEP_METRICS, "samples_per_s", "lr")
        (out / "history.json").write_text(
            json.dumps([{k: h[k] for k in history_keys} for h in state["history"]], indent=1)
        )
        plot_curves(state["history"], out / "curves.png", f"pre-training ({variant})")
        mlflow.log_artifacts(str(out / "model"), "model")
        mlflow.log_artifact(str(out / "curves.png"))
        extra["metrics"] = metrics
        extra["worker_nodes"] = record_placement(state.get("workers", []), out / "workers.json")
        if warm is not None:
            extra["warm_start"] = {"champion_version": warm["version"], "epochs": epochs}
        if variant == "sista":
            register_candidate(params, run_.info.run_id, warm["version"] if warm else None)
    return {k: round(v, 4) for k, v in metrics.items()}


def lost_nodes_stop(
    params: Params, section: PretrainSection, run_name: str
) -> contextlib.AbstractContextManager:
    """With one worker per node (STRICT_SPREAD), a lost node stops the run at once, naming it,
    instead of Ray Train waiting for a node that may never come back."""
    if section.placement_strategy != "STRICT_SPREAD":
        return contextlib.nullcontext()
    checkpoints = storage.join(params.storage.uri, f"checkpoints/{run_name}")
    return stop_when_nodes_are_lost(
        section.workers,
        "pretrain.placement_strategy STRICT_SPREAD",
        then=f"the last checkpoint is kept in {checkpoints}: run the stage again once the "
        "cluster has the nodes, and it resumes from there",
    )


def build_trainer(
    params: Params,
    section: PretrainSection,
    mlflow_run_id: str,
    name: str,
    callbacks: list[ray.train.UserCallback] | None = None,
    **loop_options: Any,
) -> TorchTrainer:
    """The ``TorchTrainer`` of one pre-training run of ``section`` (the resolved settings: the
    SISTA section, a baseline's, or a sweep trial's). ``loop_options`` reach every worker's
    config (a sweep's ``report_every`` and ``scorer``)."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "storage": params.storage.model_dump(),
            "semantics": section.semantics,
            "model": section.model_config_for("sista").to_dict(),
            "seed": section.seed,
            "lr": section.optim.lr,
            "lr_scales": dict(section.optim.lr_scales),
            "weight_decay": section.optim.weight_decay,
            "warmup_steps": section.optim.warmup_steps,
            "warmup_fraction": section.optim.warmup_fraction,
            "epochs": section.optim.epochs,
            "max_steps_per_epoch": section.optim.max_steps_per_epoch,
            "batch_size": section.optim.batch_size,
            "threads_per_worker": max(1, int(section.cpus_per_worker)),
            "gpu": section.gpu.model_dump(),
            "text_states": {
                "text_encoder": section.text.name_or_path,
                "frozen_text_layers": section.text.freeze_layers,
            },
            "tracking_uri": tracking_uri(params),
            "mlflow_run_id": mlflow_run_id,
            "log_every": 5,
            **loop_options,
        },
        scaling_config=ScalingConfig(
            num_workers=section.workers,
            use_gpu=section.use_gpu,
            resources_per_worker={"CPU": section.cpus_per_worker},
            placement_strategy=section.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            **ray_storage(params, "checkpoints"),
            failure_config=FailureConfig(max_failures=section.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def register_candidate(params: Params, run_id: str, warm_start_from: str | None = None) -> str:
    """Register this run's model folder as a new version with the alias ``candidate``, tagged
    with what produced it (``lineage.data``, ``lineage.params``, ``lineage.code``) and, for a
    warm start, the version it started from (``retrain.warm_start_from``)."""
    name = params.mlflow.registered_model
    client = mlflow.MlflowClient()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description="SISTA pre-trained image encoder")
    # Our folder is safetensors + JSON (SISTAModel.from_pretrained), not an MLflow flavour:
    # the version points straight at the logged artifact folder.
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    tags = lineage.of_ingested(params).tags()
    if warm_start_from is not None:
        tags["retrain.warm_start_from"] = warm_start_from
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, "candidate", version.version)
    return version.version


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--variant",
            default="all",
            help="all (default: sista, then every baseline), sista, or a baseline named in "
            "pretrain.baselines",
        )
        parser.add_argument(
            "--warm-start",
            action="store_true",
            help="start SISTA from the registered model's @champion and train retrain.epochs "
            "epochs (a scheduled run on new data)",
        )

    return stage_main("pretrain", run, argv, add_arguments)


if __name__ == "__main__":
    main()
