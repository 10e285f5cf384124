"""`training.report_to`: the experiment trackers people already use, besides edentune's own
metrics.jsonl and TensorBoard files.

- **mlflow**: a local store by default (`sqlite:///<output_dir>/mlflow.db`, or the workspace's
  `mlflow.db` in a cycle), so nothing needs a server or a network; `mlflow ui --backend-store-uri
  sqlite:///…/mlflow.db` shows it. `training.mlflow_tracking_uri` points elsewhere.
- **wandb**: offline run files under `<output_dir>/wandb` unless `training.wandb_mode: online`
  (then `wandb login` or WANDB_API_KEY is the user's); `wandb sync` uploads offline runs later.

The torch engine and the preference step log through transformers' own integrations (Trainer's
`report_to`: MLflowCallback, WandbCallback); the MLX engine, which drives the same callback hooks
without a Trainer, gets `TrackerCallback` below. Either way `TrackerSession` opens the run first,
so the integrations log into it instead of opening (and ending) their own: the final evaluation
that edentune runs after training, and the run's result, land in the same run.
"""

from __future__ import annotations

import os
from pathlib import Path

from edentune.config import RunConfig
from edentune.errors import ConfigError

TRAINER_TRACKERS = ("mlflow", "wandb")  # tensorboard: edentune writes <run>/tensorboard itself
EXPERIMENT = "edentune"


def trainer_report_to(cfg: RunConfig) -> list[str] | str:
    """Trainer's `report_to`: the configured trackers transformers integrates (never tensorboard,
    which edentune's own TensorBoardCallback writes), "none" without any."""
    wanted = [t for t in cfg.training.report_to if t in TRAINER_TRACKERS]
    return wanted or "none"


def mlflow_uri(cfg: RunConfig) -> str:
    if cfg.training.mlflow_tracking_uri:
        return cfg.training.mlflow_tracking_uri
    return f"sqlite:///{Path(cfg.training.output_dir).resolve() / 'mlflow.db'}"


def _numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Flat numeric metrics (nested dicts as a/b; booleans, strings and None left out)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _tracker_module(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"training.report_to lists {name}, which is not installed",
                          hint="pip install 'edentune[trackers]', or remove it from training.report_to") from None


def flat_params(params: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys (training.learning_rate: 2e-05), as trackers show parameters."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class TrackerSession:
    """The configured trackers' run for one training run or one cycle round (see the module doc).
    `close(metrics, tags)` logs the outcome and ends the runs; a session without trackers does nothing."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, run_name: str, *, params: dict | None = None,
                 tags: dict | None = None, trackers: list[str] | None = None, enabled: bool = True):
        self.trackers = [t for t in (cfg.training.report_to if trackers is None else trackers) if t in TRAINER_TRACKERS] if enabled else []
        self.mlflow = self.wandb = None
        self._env: dict[str, str | None] = {}
        run_dir = Path(run_dir)
        if "mlflow" in self.trackers:
            mlflow = _tracker_module("mlflow")

            run_dir.mkdir(parents=True, exist_ok=True)
            uri = mlflow_uri(cfg)
            if uri.startswith("sqlite:///"):
                Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            # The integration reads these (and the user's own MLFLOW_* settings stay as they are).
            self._setenv("MLFLOW_TRACKING_URI", uri)
            self._setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
            mlflow.set_tracking_uri(uri)
            if mlflow.get_experiment_by_name(EXPERIMENT) is None:
                # Artifacts beside a local store, never in the current folder (MLflow's default ./mlruns).
                local = uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).parent
                mlflow.create_experiment(EXPERIMENT, artifact_location=(local / "mlflow-artifacts").as_uri() if local else None)
            mlflow.set_experiment(EXPERIMENT)
            self.mlflow = mlflow
            self.mlflow_run = mlflow.start_run(run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()})
            if params:
                mlflow.log_params({k: str(v)[:6000] for k, v in flat_params(params).items()})
        if "wandb" in self.trackers:
            wandb = _tracker_module("wandb")

            wandb_dir = run_dir / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            mode = "online" if cfg.training.wandb_mode == "online" else "offline"
            self._setenv("WANDB_MODE", mode)
            self._setenv("WANDB_DIR", str(run_dir))
            self._setenv("WANDB_PROJECT", cfg.training.wandb_project)
            self._setenv("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.training.wandb_project, dir=str(run_dir), mode=mode, name=run_name,
                                    config=params or {}, tags=[f"{k}:{v}" for k, v in (tags or {}).items()][:20], reinit="finish_previous")

    def _setenv(self, key: str, value: str) -> None:
        self._env.setdefault(key, os.environ.get(key))
        os.environ[key] = value

    def log(self, metrics: dict, step: int | None = None) -> None:
        numbers = _numbers(metrics)
        if not numbers:
            return
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("@", "_"): v for k, v in numbers.items()}, step=step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self, metrics: dict | None = None, tags: dict | None = None, *, failed: bool = False) -> None:
        try:
            if metrics:
                numbers = _numbers(metrics)
                if self.mlflow is not None and numbers:
                    self.mlflow.log_metrics({f"final/{k}": v for k, v in numbers.items()})
                if self.wandb is not None:
                    self.wandb.summary.update(numbers)
            if tags:
                if self.mlflow is not None:
                    self.mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})
                if self.wandb is not None:
                    self.wandb.summary.update({k: str(v) for k, v in tags.items()})
        finally:
            if self.mlflow is not None:
                self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
                self.mlflow = None
            if self.wandb is not None:
                self.wandb.finish(exit_code=1 if failed else 0)
                self.wandb = None
            for key, old in self._env.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old
            self._env = {}


class TrackerCallback:
    """For the MLX engine: its callback hooks (on_log with the Trainer's log keys) into the session."""

    def __init__(self, session: TrackerSession):
        self.session = session

    def on_log(self, args, state, control, logs=None, **kw):
        self.session.log(dict(logs or {}), step=state.global_step)
