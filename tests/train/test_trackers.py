"""training.report_to: the torch engine (Trainer's own MLflow/W&B integrations), the MLX engine (the
small callback) and the preference step log into a local MLflow store and offline W&B run files;
neither needs a network, and nothing is written into the current folder."""

from __future__ import annotations

import json
import random

import pytest
from train_helpers import conversation, make_config, write_jsonl

from edentune.train import mlx_backend

pytest.importorskip("mlflow", reason="pip install 'edentune[trackers]'")


@pytest.fixture
def data(tmp_path):
    rng = random.Random(0)
    return (write_jsonl(tmp_path / "train.jsonl", [conversation(rng, 6) for _ in range(16)]),
            write_jsonl(tmp_path / "val.jsonl", [conversation(rng, 6) for _ in range(4)]))


def _mlflow_runs(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("edentune")
    return client, client.search_runs([exp.experiment_id])


def _train_and_check(cfg, run_dir, monkeypatch, tmp_path):
    from edentune.train import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train(cfg)
    client, runs = _mlflow_runs(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]  # logging_steps 1, every step
    assert "eval_loss" in run.data.metrics and run.data.metrics["final/global_step"] == 4
    assert run.data.params["training.learning_rate"] == "0.001"
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "wandb").exists()
    events = [json.loads(line)["event"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end"  # edentune's own log is unchanged


@pytest.mark.slow
def test_torch_training_logs_to_mlflow_and_wandb_offline(tiny_llama_dir, data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = make_config(tiny_llama_dir, *data, run_dir, max_steps=4, report_to=["tensorboard", "mlflow", "wandb"])
    _train_and_check(cfg, run_dir, monkeypatch, tmp_path)
    assert list((run_dir / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.mlx
@pytest.mark.skipif(not mlx_backend.mlx_installed(), reason="pip install 'edentune[mlx]' (mlx[cpu] on Linux)")
def test_mlx_training_logs_to_mlflow_and_wandb_offline(tiny_llama_dir, data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = make_config(tiny_llama_dir, *data, run_dir, max_steps=4, backend="mlx", report_to=["mlflow", "wandb"])
    _train_and_check(cfg, run_dir, monkeypatch, tmp_path)


@pytest.mark.slow
def test_preference_step_logs_to_mlflow(tiny_llama_dir, tmp_path, monkeypatch):
    from edentune.train.preference import train_preferences

    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": [{"role": "user", "content": f"Pick {i}?"}], "chosen": [{"role": "assistant", "content": "apple apple"}],
             "rejected": [{"role": "assistant", "content": "stone stone"}]} for i in range(4)]
    data = write_jsonl(tmp_path / "dpo.jsonl", rows)
    cfg = make_config(tiny_llama_dir, data, None, tmp_path / "run", report_to=["mlflow"]).updated(
        {"preference.method": "dpo", "preference.max_steps": 2, "preference.warmup_steps": 0})
    result = train_preferences(cfg, data)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    client, runs = _mlflow_runs(tmp_path / "run")  # the store of training.output_dir, beside the SFT run's
    assert len(runs) == 1 and runs[0].data.tags["step"] == "dpo"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 2


def test_an_uninstalled_tracker_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from edentune.errors import ConfigError
    from edentune.train.trackers import TrackerSession

    real = builtins.__import__

    def no_wandb(name, *a, **kw):
        if name == "wandb":
            raise ImportError("no wandb")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.setattr("importlib.import_module", lambda name: no_wandb(name))
    cfg = make_config("embedded", str(tmp_path / "t.jsonl"), None, tmp_path / "run", report_to=["wandb"])
    with pytest.raises(ConfigError, match="report_to lists wandb, which is not installed"):
        TrackerSession(cfg, tmp_path / "run", "x")
