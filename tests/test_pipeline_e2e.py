"""The whole pipeline on the CI profile: every stage as `dvc repro` would run it."""

import json
import subprocess
import sys

import mlflow
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import kill_job, stage_environment, start_stage, write_ci_params

pytestmark = pytest.mark.slow


def test_every_declared_output_exists(pipeline_run):
    folder, _ = pipeline_run
    data = folder / "data"
    expected = [
        "ingest/manifest.parquet",
        "ingest/quarantine.parquet",
        "ingest/subsets",
        "reports/reports.parquet",
        "similarity/embeddings.npy",
        "similarity/topk.parquet",
        "similarity/text_states/states.npy",
        "similarity/stats.json",
        "similarity/similarity_histogram.png",
        "ingest/sets.json",
        "evaluate/metrics.json",
        "evaluate/cells.json",
        "evaluate/headline.json",
        "evaluate/scores.json",
        "evaluate/figures/scores_vs_fraction.png",
        "evaluate/figures/examples_segmentation_phantom_pneumothorax.png",
        "evaluate/figures/examples_segmentation_phantom_opacity.png",
        "evaluate/figures/examples_detection_phantom_opacity.png",
        "evaluate/figures/heatmap_pneumothorax.png",
        "evaluate/features/sista.phantom_classification.npy",
        "evaluate/ablation.json",
        "evaluate/gate_outputs.npz",
        "publish/results.md",
        "publish/ablation.md",
        "publish/results.json",
        "publish/registry.json",
    ] + [
        f"pretrain/{v}/{f}"
        for v in ("sista", "convirt", "dense")
        for f in (
            "model/model.safetensors",
            "model/config.json",
            "metrics.json",
            "history.json",
            "curves.png",
        )
    ]
    missing = [path for path in expected if not (data / path).exists()]
    assert not missing
    # What the launcher copies into metrics/ under DVC (docs/experiments.md).
    scores = json.loads((data / "evaluate/scores.json").read_text())
    assert list(scores) == ["cls", "seg/opacity", "seg/pneumothorax", "det"]
    assert all(
        list(by_init) == ["sista", "convirt", "dense", "random"] for by_init in scores.values()
    )
    headline = json.loads((data / "evaluate/headline.json").read_text())
    seg = (scores["seg/opacity"]["sista"] + scores["seg/pneumothorax"]["sista"]) / 2
    assert headline == {
        "cls": scores["cls"]["sista"],
        "seg": round(seg, 4),
        "det": scores["det"]["sista"],
    }
    for stage in ("ingest", "reports", "similarity", "evaluate", "publish"):
        assert (data / stage / "_stage.json").exists(), stage


def test_the_similarity_cache_lines_up_with_the_reports(pipeline_run, text_encoder):
    """Embedded in batches sorted by length, stored in the reports' order: row i is report
    i's embedding, its neighbours are the nearest rows, its states span its own tokens."""
    import numpy as np
    import pyarrow as pa
    import torch
    import torch.nn.functional as F

    folder, _ = pipeline_run
    data = folder / "data"
    reports = pq.read_table(data / "reports" / "reports.parquet")
    ids = (data / "similarity" / "record_ids.txt").read_text().split()
    assert ids == reports.column("record_id").to_pylist()
    embeddings = np.load(data / "similarity" / "embeddings.npy").astype(np.float32)
    chosen = [0, len(ids) // 2, len(ids) - 1]
    text = [reports.column("text")[i].as_py() for i in chosen]
    encoder = type(text_encoder)(max_length=48).eval()  # the CI profile's length
    with torch.inference_mode():
        direct = F.normalize(encoder.encode(text)["global"], dim=-1).numpy()
    np.testing.assert_allclose(embeddings[chosen], direct, atol=3e-3)
    topk = pq.read_table(data / "similarity" / "topk.parquet")
    assert topk.column("record_id").to_pylist() == ids
    nearest = topk.column("neighbour_ids")[0].as_py()[0]
    similarity = embeddings @ embeddings[0]
    # Identical reports tie: the nearest is any row of the highest similarity.
    assert similarity[ids.index(nearest)] == pytest.approx(similarity[1:].max(), abs=1e-3)
    offsets = np.load(data / "similarity" / "text_states" / "offsets.npy")
    lengths = pa.compute.list_value_length(reports.column("input_ids")).to_numpy()
    np.testing.assert_array_equal(np.diff(offsets), lengths)


def test_every_evaluation_cell_has_a_metric(pipeline_run):
    folder, _ = pipeline_run
    cells = json.loads((folder / "data/evaluate/cells.json").read_text())
    keys = {(c["task"], c["set"], c["init"], c["fraction"], c["seed"]) for c in cells}
    assert len(keys) == 4 * 4 * 3 * 2 == len(cells)  # 4 (task, set) pairs of the CI profile
    metric_of = {"classification": "auroc", "segmentation": "dice", "detection": "map_40_75"}
    assert all(0.0 <= c[metric_of[c["task"]]] <= 1.0 for c in cells)
    metrics = json.loads((folder / "data/evaluate/metrics.json").read_text())
    assert set(metrics["segmentation"]) == {"phantom_pneumothorax", "phantom_opacity"}
    assert metrics["segmentation"]["phantom_opacity"]["images"] == "phantom"
    language = [metrics["zero_shot"]["phantom_classification"], metrics["retrieval"]["pretrain"]]
    for block in language:  # the label-free tasks: every init with a text encoder
        for metric, by_init in block.items():
            assert metric == "images" or set(by_init) == {"sista", "convirt", "dense"}
    assert metrics["heatmap_localisation"]["num_images"] > 0


def test_the_evaluation_cells_ran_side_by_side(pipeline_run):
    """Every slot of the CI profile's 2 CPUs ran cells: Tune reused its trial actors instead
    of running every cell on one actor (what happened when the trainable's module imported
    torch: the actors it started were replaced before they ran a cell)."""
    folder, _ = pipeline_run
    trials = list((folder / "data/tune/evaluate").glob("*/result.json"))
    pids = {json.loads(line)["pid"] for p in trials for line in p.read_text().splitlines()}
    assert len(trials) == 4 * 4 * 3 * 2
    assert len(pids) >= 2  # 1 before: every cell on the first actor


def test_evaluation_trains_on_the_subsets_ingest_saved(pipeline_run):
    folder, _ = pipeline_run
    subsets = folder / "data/ingest/subsets"
    cells = json.loads((folder / "data/evaluate/cells.json").read_text())
    for cell in cells:
        name = f"{cell['set']}-train-frac{cell['fraction']:g}-seed{cell['seed']}.txt"
        assert cell["train_size"] == len((subsets / name).read_text().split()), name


def test_mlflow_holds_every_stage_and_the_registered_candidate(pipeline_run):
    folder, _ = pipeline_run
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    for stage in ("ingest", "reports", "similarity", "pretrain", "evaluate", "publish"):
        experiment = client.get_experiment_by_name(f"sista-{stage}")
        assert experiment is not None, stage
        runs = client.search_runs([experiment.experiment_id])
        assert runs and all(r.info.status == "FINISHED" for r in runs), stage
    pretrain = client.get_experiment_by_name("sista-pretrain")
    sista_run = client.search_runs(
        [pretrain.experiment_id], "attributes.run_name = 'pretrain-sista'"
    )[0]
    assert sista_run.data.params["pretrain.sia.mode"] == "eliminate"
    losses = client.get_metric_history(sista_run.info.run_id, "loss_sta")
    assert losses and all(m.value > 0 for m in losses)
    candidate = client.get_model_version_by_alias("sista-encoder", "candidate")
    champion = client.get_model_version_by_alias("sista-encoder", "champion")
    assert candidate.version == champion.version  # the first candidate always becomes champion
    # Lineage and the gate's record on the version; the outputs the next candidate is paired with.
    tags = champion.tags
    assert {"lineage.data", "lineage.params", "lineage.code", "lineage.sources"} <= set(tags)
    assert (tags["gate.rule"], tags["gate.promoted"]) == ("first champion", "True")
    kept = client.list_artifacts(champion.run_id, "gate")
    assert [f.path for f in kept] == ["gate/gate_outputs.npz"]
    publish = client.get_experiment_by_name("sista-publish")
    publish_run = client.search_runs([publish.experiment_id])[0]
    assert publish_run.data.tags["lineage.data"] == tags["lineage.data"]


def test_a_scheduled_run_with_nothing_new_has_nothing_to_retrain(pipeline_run):
    folder, _ = pipeline_run
    check = subprocess.run(
        [sys.executable, "-m", "components.platform.lineage", "--params", "params.yaml"],
        cwd=folder,
        env=stage_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 3, check.stdout + check.stderr
    assert "nothing changed since run" in check.stdout
    status = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status"],
        cwd=folder,
        env=stage_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    champion = next(line for line in status.stdout.splitlines() if "@champion" in line)
    assert "score=" in champion and "data=" in champion and "data=?" not in champion


def test_results_table_lists_every_initialisation(pipeline_run):
    folder, result = pipeline_run
    table = (folder / "data/publish/results.md").read_text()
    for init in ("sista", "convirt", "dense", "random"):
        assert f"| {init} |" in table
    assert "phantom" in table
    assert "promoted sista-encoder" in result.stdout


def test_ingest_splits_are_patient_disjoint_and_subsets_nested(pipeline_run):
    folder, _ = pipeline_run
    rows = pq.read_table(folder / "data/ingest/manifest.parquet").to_pylist()
    downstream = [r for r in rows if r["dataset"] == "phantom_classification"]
    by_split = {}
    for row in downstream:
        by_split.setdefault(row["split"], set()).add(row["patient_id"])
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    pretrain_patients = {r["patient_id"] for r in rows if r["dataset"] == "pretrain"}
    assert not pretrain_patients & {r["patient_id"] for r in downstream}
    subsets = folder / "data/ingest/subsets"
    for seed in (0, 1):
        small, medium, full = (
            set(
                (subsets / f"phantom_classification-train-frac{f}-seed{seed}.txt")
                .read_text()
                .split()
            )
            for f in ("0.01", "0.1", "1")
        )
        assert small <= medium <= full
        assert full == {r["record_id"] for r in downstream if r["split"] == "train"}


def test_killed_pretraining_resumes_from_its_last_checkpoint(pipeline_run):
    import subprocess
    import sys
    import time

    folder, _ = pipeline_run
    complete_output = (folder / "data/pretrain/sista/_stage.json").read_text()
    write_ci_params(folder, **{"pretrain.optim.epochs": 3})
    arguments = ["pretrain", "--variant", "sista"]
    earlier = set((folder / "data/checkpoints").glob("pretrain-sista-*/checkpoint_*"))
    first = start_stage(folder, arguments, folder / "killed-pretrain.log")
    deadline = time.time() + 300
    registered = False
    while time.time() < deadline and not registered and first.poll() is None:
        time.sleep(0.5)
        found = set((folder / "data/checkpoints").glob("pretrain-sista-*/checkpoint_*"))
        new = sorted(found - earlier)  # this run's, not the earlier 2-epoch run's
        # Kill once Ray has recorded the checkpoint in its snapshot, i.e. it is complete.
        snapshot = new[0].parent / "checkpoint_manager_snapshot.json" if new else None
        registered = bool(snapshot and snapshot.exists() and new[0].name in snapshot.read_text())
    assert registered, "no checkpoint was registered before the deadline"
    kill_job(first)  # SIGKILL of the job's whole process group
    # Killed mid-stage: the previous complete output is still in place, untouched.
    assert (folder / "data/pretrain/sista/_stage.json").read_text() == complete_output

    second = subprocess.run(
        [sys.executable, "-m", "pipeline.launch", *arguments],
        cwd=folder,
        env=stage_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    history = json.loads((folder / "data/pretrain/sista/history.json").read_text())
    metrics = json.loads((folder / "data/pretrain/sista/metrics.json").read_text())
    assert metrics["epoch"] == 3

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sista-pretrain")
    runs = client.search_runs(
        [experiment.experiment_id],
        "attributes.run_name = 'pretrain-sista'",
        order_by=["attributes.start_time DESC"],
    )
    resumed_steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    steps_per_epoch = metrics["step"] // 3
    # The resumed run logs only the steps after its last checkpoint (at least one epoch in):
    # the step counter continues instead of starting over.
    assert min(resumed_steps) > steps_per_epoch
    assert history[-1]["step"] == max(resumed_steps) <= metrics["step"]
