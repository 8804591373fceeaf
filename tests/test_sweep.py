"""`sista sweep`: its config fails early, its result applies to params.yaml, and on the CI
profile it runs Ray Tune trials as MLflow child runs of one parent and writes the best."""

import json
import subprocess
import sys

import mlflow
import pytest
import yaml
from pipeline_helpers import ROOT, run_stages, write_ci_params

from components.platform.config import ConfigError, Params, load_params
from components.stages.sweep import (
    baseline,
    beats_on_one_seed,
    best_row,
    choose,
    current_values,
    plot_signal,
    results_markdown,
    trial_section,
    trial_settings,
)
from components.stages.sweep_best import apply_best, dvc_arguments


def write(tmp_path, data):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "space, message",
    [
        (
            {"pretrain.loss.sia_wieght": {"uniform": [0, 1]}},
            "pretrain.loss has no 'sia_wieght' (known: intra_weight, sia_weight, sta_weight)",
        ),
        ({"ingest.seed": {"choice": [1, 2]}}, "only pretrain settings are swept"),
        ({"pretrain.sia.mode": {"choice": [1]}}, "is not a number of the pretrain section"),
        ({"pretrain.loss.sia_weight": {"uniform": [2, 1]}}, "low must be below high"),
        ({"pretrain.loss.sia_weight": {"choice": [1], "q": 0.1}}, "q rounds uniform"),
        (
            {"pretrain.loss.sta_weight": {"uniform": [-1, 1]}},
            "sweep.space.pretrain.loss.sta_weight: -1.0 is invalid: Input should be greater",
        ),
    ],
)
def test_a_bad_sweep_space_fails_before_any_work(tmp_path, space, message):
    with pytest.raises(ConfigError) as error:
        load_params(write(tmp_path, {"sweep": {"space": space}}))
    assert message in str(error.value)


def test_a_trial_trains_params_yaml_with_its_values_and_the_sweep_resources():
    params = Params.model_validate(
        {"sweep": {"epochs": 2, "cpus_per_worker": 0.75}, "pretrain": {"optim": {"epochs": 5}}}
    )
    section = trial_section(
        params, {"pretrain.loss.sia_weight": 0.4, "pretrain.sia.threshold": 0.8}
    )
    assert section.loss.sia_weight == 0.4 and section.sia.threshold == 0.8
    assert section.loss.sta_weight == params.pretrain.loss.sta_weight
    assert section.optim.epochs == 2 and section.cpus_per_worker == 0.75
    assert current_values(params)["pretrain.loss.intra_weight"] == 0.5
    assert trial_settings(
        {"pretrain.loss.sia_weight": 0.9500000000000001}, ["pretrain.loss.sia_weight"]
    ) == {"pretrain.loss.sia_weight": 0.95}


def trial(trial_id, state, signal, phase="search", seed=None, reports=None):
    """A trial row as ``trial_rows`` writes it; by default one report at the end (step 58)."""
    if reports is None:
        reports = [] if signal is None else [{"step": 58, "signal": signal}]
    return {
        "trial_id": trial_id,
        "phase": phase,
        "seed": seed,
        "state": state,
        "signal": signal,
        "settings": {"pretrain.loss.sia_weight": 1.0 if phase == "current" else 0.5},
        "reports": reports,
        "steps": reports[-1]["step"] if reports else 0,
    }


def current_seeds(*signals):
    return [trial(f"c{i}", "completed", s, "current", seed=i) for i, s in enumerate(signals)]


def test_the_best_is_the_highest_trial_that_trained_to_the_end():
    rows = [
        trial("a", "completed", 0.55),
        trial("b", "stopped at step 30", 0.70),
        trial("c", "completed", 0.58),
        trial("d", "failed", None),
    ]
    assert best_row(rows)["trial_id"] == "c"
    assert best_row([rows[1], rows[3]]) is None
    chosen = choose(rows, noise_sds=2.0)  # no baseline: the best completed trial wins
    assert chosen["decision"] == "sampled" and chosen["row"]["trial_id"] == "c"
    with pytest.raises(RuntimeError, match="no sweep trial trained to the end"):
        choose([rows[1], rows[3]], noise_sds=2.0)


def test_the_baseline_is_the_current_values_spread_over_seeds_at_each_report():
    reports = [
        [{"step": 20, "signal": a}, {"step": 58, "signal": b}]
        for a, b in [(0.50, 0.60), (0.52, 0.61), (0.54, 0.62)]
    ]
    rows = [
        trial(f"c{i}", "completed", r[-1]["signal"], "current", i, r) for i, r in enumerate(reports)
    ]
    rows.append(trial("c3", "failed", None, "current", 3))  # left out, not counted as a seed
    current = baseline(rows + [trial("a", "completed", 0.9)])
    assert current["seeds"] == [0, 1, 2]
    assert current["mean"] == pytest.approx(0.61) and current["sd"] == pytest.approx(0.01)
    assert [p["step"] for p in current["by_step"]] == [20, 58]
    assert current["by_step"][0]["mean"] == pytest.approx(0.52)
    assert current["by_step"][0]["sd"] == pytest.approx(0.02)
    assert baseline([trial("a", "completed", 0.9)]) is None


@pytest.mark.parametrize(
    "sampled, decision, reason",
    [
        (0.625, "current", "within the noise (2 sd over 3 seeds = 0.0200)"),
        (0.6301, "sampled", "trial a beats the current values by +0.0201 > 0.0200"),
        (0.55, "current", "within the noise"),
        (None, "current", "no sampled trial trained to the end"),
    ],
)
def test_a_sampled_trial_replaces_the_defaults_only_beyond_the_seed_noise(
    sampled, decision, reason
):
    rows = current_seeds(0.60, 0.61, 0.62)
    rows.append(trial("a", "completed", sampled) if sampled else trial("a", "failed", None))
    rows.append(trial("b", "stopped at step 20", 0.99))  # scored on less training: ignored
    chosen = choose(rows, noise_sds=2.0)
    assert chosen["decision"] == decision
    assert reason in chosen["reason"]
    assert chosen["margin"] == pytest.approx(0.02)
    if decision == "current":
        assert chosen["row"]["settings"] == rows[0]["settings"]
        assert chosen["row"]["signal"] == pytest.approx(0.61)
    else:
        assert chosen["row"]["trial_id"] == "a"


@pytest.mark.parametrize(
    "others, decision, reason",
    [
        (
            (0.64, 0.65),
            "sampled",
            "trial a beats the current values by +0.0367 > 0.0200 over 3 seeds",
        ),
        ((0.60, 0.61), "current", "by +0.0400 on one seed but by +0.0100 over 3 seeds, within"),
    ],
)
def test_a_winner_on_one_seed_must_hold_on_the_baseline_seeds(others, decision, reason):
    """The best of many noisy trials looks better than it is: its settings are trained on the
    baseline's other seeds, and its mean over them decides."""
    rows = [*current_seeds(0.60, 0.61, 0.62), trial("a", "completed", 0.65)]
    assert beats_on_one_seed(rows, noise_sds=2.0)["trial_id"] == "a"
    rows += [trial(f"a{i}", "completed", s, "confirm", seed=i + 1) for i, s in enumerate(others)]
    chosen = choose(rows, noise_sds=2.0)
    assert chosen["decision"] == decision and reason in chosen["reason"]
    if decision == "sampled":
        assert chosen["row"]["settings"] == rows[3]["settings"]
        assert chosen["row"]["signal"] == pytest.approx(0.6467, abs=1e-4)
    assert beats_on_one_seed(current_seeds(0.60, 0.61, 0.62), noise_sds=2.0) is None


def test_one_seed_gives_no_noise_estimate_so_any_gain_counts():
    rows = [*current_seeds(0.60), trial("a", "completed", 0.6001)]
    chosen = choose(rows, noise_sds=2.0)
    assert chosen["decision"] == "sampled" and chosen["margin"] == 0.0


def test_the_results_table_shows_each_trial_against_the_current_mean_at_its_step(tmp_path):
    reports = [
        [{"step": 20, "signal": a}, {"step": 58, "signal": b}]
        for a, b in [(0.50, 0.60), (0.54, 0.62)]
    ]
    rows = [
        trial(f"c{i}", "completed", r[-1]["signal"], "current", i, r) for i, r in enumerate(reports)
    ]
    rows.append(trial("a", "stopped at step 20", 0.55, reports=[{"step": 20, "signal": 0.55}]))
    chosen = choose(rows, noise_sds=2.0)
    summary = {
        "parent_run_id": "p",
        "date": "d",
        "metric": "val_probe_auroc",
        "report_every": 20,
        "total_steps": 58,
        "current": baseline(rows),
        "best_trial_id": None,
        **chosen,
    }
    text = results_markdown(rows, summary)
    assert "| 20 | 0.5000 | 0.5400 | 0.5200 | 0.0283 |" in text
    assert "0.550@20 (+0.030)" in text
    assert "Chosen: current values: no sampled trial trained to the end." in text
    plot_signal(rows, {**summary, "noise_sds": 2.0}, tmp_path / "signal.png")
    assert (tmp_path / "signal.png").read_bytes().startswith(b"\x89PNG")


BEST = "# from a sweep\npretrain.loss.sia_weight: 0.6\npretrain.sia.temperature: 0.05\n"


def test_apply_writes_the_best_into_params_yaml_keeping_its_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    best = tmp_path / "best_params.yaml"
    best.write_text(BEST)
    changed = apply_best(params, best)
    assert changed == {
        "pretrain.loss.sia_weight": (1.0, 0.6),
        "pretrain.sia.temperature": (0.07, 0.05),
    }
    applied = load_params(params)
    assert applied.pretrain.loss.sia_weight == 0.6 and applied.pretrain.sia.temperature == 0.05
    text = params.read_text()
    assert "# Every tunable number of the pipeline" in text  # comments survive
    assert "mode: eliminate" in text
    assert dvc_arguments(best) == "-S pretrain.loss.sia_weight=0.6 -S pretrain.sia.temperature=0.05"


def test_apply_refuses_a_result_that_would_make_params_yaml_invalid(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = params.read_text()
    best = tmp_path / "best_params.yaml"
    best.write_text("pretrain.loss.sia_weight: -1\n")
    with pytest.raises(ConfigError, match="pretrain.loss.sia_weight"):
        apply_best(params, best)
    best.write_text("pretrain.losses.sia_weight: 1\n")
    with pytest.raises(ConfigError, match="not a swept key"):
        apply_best(params, best)
    best.write_text("storage.uri: s3://attacker/bucket\n")  # a key the sweep never searched
    with pytest.raises(ConfigError, match="storage.uri: not a swept key"):
        apply_best(params, best)
    best.write_text("pretrain.loss.sia_weight: [1, 2]\n")
    with pytest.raises(ConfigError, match="is not a number"):
        apply_best(params, best)
    assert params.read_text() == before


@pytest.mark.slow
@pytest.mark.system
@pytest.mark.timeout(2400)
def test_a_ci_sweep_logs_child_runs_under_one_parent_and_its_best_applies(tmp_path):
    """params.yaml's values on two seeds (the noise), then two sampled trials with ASHA: every
    trial a child run of the sweep's parent run, stopped trials closed as KILLED, the chosen
    settings follow the noise rule and apply."""
    write_ci_params(tmp_path, ("phantom_classification",))
    stages = [["ingest"], ["reports"], ["similarity"], ["sweep"]]
    result = run_stages(tmp_path, stages, timeout=2300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    out = tmp_path / "data" / "sweep"
    record = json.loads((out / "trials.json").read_text())
    summary, trials = record["summary"], record["trials"]
    params = load_params(tmp_path / "params.yaml")
    current = [t for t in trials if t["phase"] == "current"]
    assert [t["seed"] for t in current] == [0, 1]
    assert len([t for t in trials if t["phase"] == "search"]) == 2
    for confirming in [t for t in trials if t["phase"] == "confirm"]:  # the winner, seed 1
        best = next(t for t in trials if t["trial_id"] == summary["best_trial_id"])
        assert confirming["settings"] == best["settings"] and confirming["seed"] == 1
    for seed_trial in current:  # the baseline is never stopped early
        assert seed_trial["state"] == "completed", seed_trial
        assert seed_trial["settings"] == current_values(params)
    assert summary["current"]["seeds"] == [0, 1]
    assert summary["total_steps"] > 4  # reports at step 4, 8, ... and at the end
    assert summary["current"]["by_step"][-1]["step"] == summary["total_steps"]
    assert summary["decision"] in ("current", "sampled") and summary["reason"]

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.decision"] == summary["decision"]
    assert parent.data.metrics["current_val_probe_auroc"] == pytest.approx(
        summary["current"]["mean"]
    )
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert {run.info.run_id for run in children} == {t["mlflow_run_id"] for t in trials}
    for trial in trials:
        child = client.get_run(trial["mlflow_run_id"])
        expected = "FINISHED" if trial["state"] == "completed" else "KILLED"
        assert child.info.status == expected, trial
        logged = {k: str(v) for k, v in trial["settings"].items()}
        if trial["seed"] is not None:
            logged["pretrain.seed"] = str(trial["seed"])
        assert child.data.params == logged
        signal = client.get_metric_history(child.info.run_id, "val_probe_auroc")
        assert [m.step for m in signal] == [r["step"] for r in trial["reports"]]
    assert all(t["steps"] >= 4 for t in trials)  # a stopped trial frees its CPUs for the next

    assert (out / "signal.png").read_bytes().startswith(b"\x89PNG")
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert set(best) == set(params.sweep.space)
    if summary["decision"] == "current":
        assert best == current_values(params)
    else:
        chosen = next(t for t in trials if t["trial_id"] == summary["chosen_trial_id"])
        assert chosen["phase"] == "search" and best == chosen["settings"]
        assert chosen["signal"] - summary["current"]["mean"] > summary["margin"]
    applied = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "sweep", "--apply"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert applied.returncode == 0, applied.stderr
    assert current_values(load_params(tmp_path / "params.yaml")) == best
