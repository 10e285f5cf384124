"""A cycle workspace: one config (`cycle.yaml`), one registry, and a folder per round and persona.

    DIR/cycle.yaml                     WorkspaceConfig
    DIR/registry.sqlite                the registry (edentune/registry.py)
    DIR/fixed/validation.jsonl         fixed validation set, shared by all rounds
    DIR/fixed/forgetting.jsonl         general data never trained on
    DIR/replay/buffer.jsonl            the replay buffer (replay.py)
    DIR/rounds/<round>/shared/data/    ingested + cleaned data of the round
    DIR/rounds/<round>/<persona>/      config.yaml (the frozen RunConfig) and data/ run/ eval/ export/

`cycle.yaml` holds a full RunConfig under `run:` (the template of every round) plus the cycle's
own policies. Paths in it are relative to the workspace; the per-round paths of the RunConfig
(training.output_dir, data.*_files) are set by `Workspace.round_config`, whatever the template says.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..config import (MixConfig, PersonaConfig, RunConfig, config_for_model, format_validation_error, parse_config,
                      render_config_yaml)
from ..errors import ConfigError, EdentuneError
from ..io import write_text_atomic
from ..models import model_reference_problem
from ..ollama_names import check_ollama_name
from ..registry import REGISTRY_NAME, SHARED, Registry
from .lock import LOCK_NAME, holds_workspace_lock

CONFIG_NAME = "cycle.yaml"
LAYOUT = (CONFIG_NAME, REGISTRY_NAME, f"{REGISTRY_NAME}-wal", f"{REGISTRY_NAME}-shm", "fixed", "replay", "rounds", LOCK_NAME, "mlflow.db")
BUNDLED_FORGETTING = Path(__file__).resolve().parents[1] / "data" / "sample" / "replay.jsonl"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
ROUND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PersonaSelect(_Section):
    field: str = Field(..., min_length=1, description="record key to test, e.g. persona")
    equals: str = Field(..., description="keep records whose key has this value")


class WorkspacePersona(_Section):
    name: str = Field(..., description="folder and registry name: lowercase letters, digits, _ and -")
    system_prompt: str | None = Field(None, description="default: run.model.system_prompt")
    ollama_model: str | None = Field(None, description="default: run.export.model_name, plus -NAME unless the persona is 'default'")
    select: PersonaSelect | None = Field(None, description="train on the round's records whose field equals a value")
    files: list[str] | None = Field(None, description="this persona's own data files (relative to the workspace)")
    persona: PersonaConfig | None = Field(None, description="overrides of run.persona (evaluation rules)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a usable name: use 1-40 lowercase letters, digits, _ and -, starting with a letter or digit")
        if v == SHARED:
            raise ValueError(f"{SHARED!r} is reserved (the registry's name for steps shared by all personas)")
        return v

    @field_validator("ollama_model")
    @classmethod
    def _ollama_model(cls, v: str | None) -> str | None:
        return v if v is None else check_ollama_name(v)


class ValidationPolicy(_Section):
    fraction: float = Field(0.1, gt=0, lt=1, description="share of the first round's clean data frozen as the validation set")
    files: list[str] = Field(default_factory=list, description="fixed validation files; when given, nothing is split off")
    # Counted after the max_seq_len length filter (what training and the gate actually score);
    # until both are met, each round moves up to `max_share` of its new conversations into the set.
    min_conversations: int = Field(30, ge=1, description="the set chooses checkpoints and gates rounds: at least this many conversations")
    min_tokens: int = Field(3000, ge=0, description="and at least this many scored (assistant) tokens")
    max_share: float = Field(0.3, gt=0, lt=1, description="most of one month's new conversations taken to grow the set")


class GatePolicy(_Section):
    require_val_loss_improvement: bool = Field(True, description="ship only if validation loss beats the live round's")
    min_val_loss_delta: float = Field(0.0, ge=0, description="by at least this much")
    max_cumulative_forgetting: float = Field(0.2, ge=0, description="allowed replay perplexity increase over the ORIGINAL base "
                                             "(forgetting that builds up over months; the per-round limit is run.evaluation.max_forgetting)")
    human_prompts: int = Field(0, ge=0, description="real user prompts of the month held out from training and answered by "
                               "the live and the candidate model for the blind comparison of `edentune review` (0: none)")
    human_min_win_rate: float | None = Field(None, ge=0, le=1, description="wait at the gate for the blind picks, then ship "
                                             "only if the candidate's win rate (ties count half) is at least this")
    human_min_picks: int | None = Field(None, gt=0, description="picks needed before the gate decides (default: every pair)")

    @model_validator(mode="after")
    def _human(self) -> GatePolicy:
        if self.human_min_win_rate is not None and not self.human_prompts:
            raise ValueError("human_min_win_rate needs human_prompts > 0 (the prompts held out for the blind comparison)")
        return self


class OllamaPolicy(_Section):
    host: str | None = Field(None, description="Ollama URL (default: run.export.ollama_host, $OLLAMA_HOST, 127.0.0.1:11434)")
    base: str | None = Field(None, description="Ollama base model tag (default: run.export.ollama_base)")
    replace: str | None = Field(None, description="deploy in place of this tag, e.g. qwen2.5:7b (the model Garden of Eden V3 "
                                "calls); the original is kept as TAG-edentune-original (docs/deploy-to-ollama.md)")
    allow_base_mismatch: bool = Field(False, description="replace: allow a tag whose base differs from the trained base")

    @field_validator("base")
    @classmethod
    def _base(cls, v: str | None) -> str | None:
        return v if v is None else check_ollama_name(v)


def _default_personas() -> list[WorkspacePersona]:
    return [WorkspacePersona(name="default")]


class WorkspaceConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    personas: list[WorkspacePersona] = Field(default_factory=_default_personas, min_length=1)
    adapter_mode: Literal["per_persona", "shared"] = "per_persona"
    replay: MixConfig = Field(default_factory=MixConfig)
    continue_from: Literal["live", "base"] = "live"
    validation: ValidationPolicy = Field(default_factory=ValidationPolicy)
    forgetting_files: list[str] = Field(default_factory=list)
    gate: GatePolicy = Field(default_factory=GatePolicy)
    ollama: OllamaPolicy = Field(default_factory=OllamaPolicy)
    review: Literal["off", "optional", "required"] = "optional"

    @field_validator("personas")
    @classmethod
    def _unique(cls, personas: list[WorkspacePersona], info: ValidationInfo) -> list[WorkspacePersona]:
        run = info.data.get("run")  # validated first (field order); absent when it has errors itself
        names, models = set(), {}
        for p in personas:
            if p.name in names:
                raise ValueError(f"the name {p.name!r} appears twice")
            names.add(p.name)
            model = p.ollama_model or (_default_model(run.export.model_name, p.name) if run else None)
            if model in models:
                raise ValueError(f"{models[model]!r} and {p.name!r} would both deploy to the Ollama model {model!r}; "
                                 "give each its own ollama_model")
            if model:
                models[model] = p.name
        return personas

    @model_validator(mode="after")
    def _one_model_replaced(self) -> WorkspaceConfig:
        if self.ollama.replace and len(self.personas) > 1:
            raise ValueError(f"ollama.replace publishes one model under {self.ollama.replace}: keep one persona")
        return self

    def ollama_model(self, p: WorkspacePersona) -> str:
        return p.ollama_model or self.ollama.replace or _default_model(self.run.export.model_name, p.name)


def _default_model(model_name: str, persona: str) -> str:
    return model_name if persona == "default" else f"{model_name}-{persona}"


def _format_errors(err: ValidationError, source: str) -> str:
    return format_validation_error(err, source, "workspace configuration", "edentune cycle init")


def check_round_id(round_id: str) -> str:
    if not ROUND_RE.match(round_id) or ".." in round_id:
        raise EdentuneError(f"round id {round_id!r} is not usable as a folder name",
                            hint="use letters, digits, '.', '_' and '-' (the default is the month, e.g. 2026-01)")
    return round_id


@dataclass
class Workspace:
    dir: Path
    config: WorkspaceConfig

    # -- fixed places ----------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_NAME

    @property
    def registry_path(self) -> Path:
        return self.dir / REGISTRY_NAME

    @property
    def fixed_dir(self) -> Path:
        return self.dir / "fixed"

    @property
    def validation_path(self) -> Path:
        return self.fixed_dir / "validation.jsonl"

    @property
    def forgetting_path(self) -> Path:
        return self.fixed_dir / "forgetting.jsonl"

    @property
    def replay_dir(self) -> Path:
        return self.dir / "replay"

    @property
    def buffer_path(self) -> Path:
        return self.replay_dir / "buffer.jsonl"

    @property
    def mlflow_path(self) -> Path:
        """The MLflow store of `training.report_to: [mlflow]` (training runs and one run per round)."""
        return self.dir / "mlflow.db"

    @property
    def rounds_dir(self) -> Path:
        return self.dir / "rounds"

    # -- per round -------------------------------------------------------------------------
    def round_dir(self, round_id: str, persona: str | None = None) -> Path:
        d = self.rounds_dir / check_round_id(round_id)
        return d if persona is None else d / persona

    def shared_data_dir(self, round_id: str) -> Path:
        return self.round_dir(round_id, SHARED) / "data"

    def data_dir(self, round_id: str, persona: str) -> Path:
        return self.round_dir(round_id, persona) / "data"

    def new_data_path(self, round_id: str, persona: str) -> Path:
        """The round's new training records for a persona (before mixing): what the replay buffer draws from."""
        return self.data_dir(round_id, persona) / "new.jsonl"

    def train_data_path(self, round_id: str, persona: str) -> Path:
        """The mixed training set (new + replay)."""
        return self.data_dir(round_id, persona) / "train.jsonl"

    def run_dir(self, round_id: str, persona: str) -> Path:
        return self.round_dir(round_id, persona) / "run"

    def eval_dir(self, round_id: str, persona: str) -> Path:
        return self.round_dir(round_id, persona) / "eval"

    def export_dir(self, round_id: str, persona: str) -> Path:
        return self.round_dir(round_id, persona) / "export"

    def frozen_config_path(self, round_id: str, persona: str) -> Path:
        return self.round_dir(round_id, persona) / "config.yaml"

    # -- personas --------------------------------------------------------------------------
    @property
    def persona_names(self) -> list[str]:
        return [p.name for p in self.config.personas]

    def persona(self, name: str) -> WorkspacePersona:
        for p in self.config.personas:
            if p.name == name:
                return p
        raise EdentuneError(f"no persona {name!r} in {self.config_path}", hint=f"personas: {', '.join(self.persona_names)}")

    def ollama_model(self, name: str) -> str:
        return self.config.ollama_model(self.persona(name))

    def system_prompt(self, name: str) -> str | None:
        return self.persona(name).system_prompt or self.config.run.model.system_prompt

    def training_units(self) -> list[str]:
        """What gets its own adapter, gate and run row: each persona, or SHARED in shared mode."""
        return [SHARED] if self.config.adapter_mode == "shared" else self.persona_names

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.dir / p).resolve()

    def persona_files(self, name: str) -> list[Path] | None:
        files = self.persona(name).files
        return None if files is None else [self.resolve(f) for f in files]

    def validation_sources(self) -> list[Path]:
        """Configured fixed validation files (empty: split off the first round's data)."""
        return [self.resolve(f) for f in self.config.validation.files]

    def forgetting_sources(self) -> list[Path]:
        """Configured forgetting files, else the bundled general sample."""
        return [self.resolve(f) for f in self.config.forgetting_files] or [BUNDLED_FORGETTING]

    def suite_ref(self) -> str:
        """The evaluation suite: a bundled name as is, a path resolved against the workspace."""
        from ..evaluate.suite import SUITES_DIR

        name = self.config.run.evaluation.suite
        return name if (SUITES_DIR / f"{name}.yaml").is_file() else str(self.resolve(name))

    def open_registry(self, *, readonly: bool = False) -> Registry:
        return Registry(self.registry_path, readonly=readonly)

    # -- the RunConfig of one round --------------------------------------------------------
    def round_config(self, round_id: str, persona: str) -> RunConfig:
        """The template with the persona's settings and this round's paths (`persona` = SHARED in shared mode)."""
        c = self.config
        data = c.run.model_dump()
        data["training"]["output_dir"] = str(self.run_dir(round_id, persona))
        if "mlflow" in data["training"].get("report_to", ()) and not data["training"].get("mlflow_tracking_uri"):
            data["training"]["mlflow_tracking_uri"] = f"sqlite:///{self.mlflow_path}"  # one store for every round
        data["data"].update(train_files=[str(self.train_data_path(round_id, persona))],
                            validation_files=[str(self.validation_path)], replay_files=[str(self.forgetting_path)],
                            mix=c.replay.model_dump())
        data["evaluation"]["suite"] = self.suite_ref()
        exp = data["export"]
        exp["ollama_base"] = c.ollama.base or exp["ollama_base"]
        exp["ollama_host"] = c.ollama.host or exp["ollama_host"]
        exp["replace"] = c.ollama.replace or exp["replace"]
        exp["allow_base_mismatch"] = c.ollama.allow_base_mismatch or exp["allow_base_mismatch"]
        if exp["eden_system_file"]:  # relative to the workspace, like its other files
            exp["eden_system_file"] = str(self.resolve(exp["eden_system_file"]))
        if persona == SHARED:
            exp["personas"] = {self.ollama_model(n): self.system_prompt(n) for n in self.persona_names}
        else:
            p = self.persona(persona)
            data["model"]["system_prompt"] = self.system_prompt(persona)
            if p.persona is not None:
                data["persona"].update(p.persona.model_dump(exclude_unset=True))
            exp["model_name"], exp["personas"] = self.ollama_model(persona), {}
        return parse_config(data, f"{self.config_path} (round {round_id}, persona {persona})")


def _parse(data: object, source: str) -> WorkspaceConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (run, personas, replay, gate, ...)")
    try:
        return WorkspaceConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source), hint="fix the key(s) named above; nothing was changed") from None


def is_workspace(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / REGISTRY_NAME).is_file()


def load_workspace(path: str | Path) -> Workspace:
    """Read and check `DIR/cycle.yaml`; errors name the key. Changes nothing on disk."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{path}: no such workspace folder", hint=f"create one with `edentune cycle init {path}`")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise ConfigError(f"{path}: not a cycle workspace (no {CONFIG_NAME})", hint=f"create one with `edentune cycle init {path}`")
    try:
        data = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{cfg_path}: not valid YAML: {err}", hint="fix the file; nothing was changed") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{cfg_path}: cannot read it ({err})") from None
    if not (path / REGISTRY_NAME).is_file():
        raise ConfigError(f"{path}: {CONFIG_NAME} is there but the registry ({REGISTRY_NAME}) is missing",
                          hint="restore registry.sqlite from a backup, or run `edentune cycle init --force` to start a new one")
    return Workspace(path.resolve(), _parse(data, str(cfg_path)))


# -- rendering `cycle.yaml` ------------------------------------------------------------------
_HEADER = """\
# edentune cycle workspace. One round per month: edentune cycle run {dir} --new NEW.jsonl
# Relative paths are relative to this folder. Check it with: edentune cycle status {dir}
"""
_COMMENTS = {
    "personas": "one adapter, gate and Ollama model per persona (adapter_mode: per_persona), or one shared adapter\n"
                "# with a SYSTEM prompt per persona (adapter_mode: shared). Keys: name, system_prompt, ollama_model,\n"
                "# select: {field, equals} (train on matching records), files: [its own data], persona: {rule overrides}",
    "adapter_mode": "per_persona | shared",
    "replay": "the training mix: every new record, plus replay from the buffer of accepted rounds so that new data is\n"
              "# new_ratio of the mix (0.7: 3 replay per 7 new), drawn in the buffer's category proportions; quotas: the\n"
              "# most records per category the BUFFER keeps (record 'category' field, else the topic rules); seed: reproducible",
    "continue_from": "live: train on top of the live round's adapter | base: retrain from the base model each round",
    "validation": "the fixed validation set shared by all rounds (never trained on, never in the replay buffer); only\n"
                  "# conversations within max_seq_len; below min_conversations / min_tokens it grows from each month (max_share)",
    "forgetting_files": "general data never trained on, to measure forgetting (empty: the bundled general sample)",
    "gate": "deploy only if better: validation loss must improve over the live round's AND `compare` must say ship\n"
            "# (no metric worse beyond noise, run.evaluation.significance) AND forgetting against the original base\n"
            "# stays within max_cumulative_forgetting",
    "ollama": "where rounds are deployed",
    "review": "the data review of `edentune review DIR`: off (decisions ignored) | optional (rejected conversations and\n"
              "# edits apply, the rest trains) | required (`cycle run` waits after cleaning until every conversation is decided)",
}


def _run_section(run: RunConfig) -> list[str]:
    lines = render_config_yaml(run).splitlines()
    body = lines[lines.index("") + 1:]  # drop render_config_yaml's own header (it names `edentune config check`)
    return ["# The run template of every round (model, LoRA, training, evaluation, export, persona rules).",
            "# Set per round by the cycle, whatever is written here: training.output_dir, data.*_files,",
            "# data.mix (from `replay` below), export.model_name/personas (from `personas` below).",
            "run:"] + ["  " + line if line else "" for line in body] + [""]


def render_workspace_yaml(cfg: WorkspaceConfig, dir_label: str = "DIR") -> str:
    data = cfg.model_dump(mode="json", exclude={"run"})
    # Only what was set: a persona's `persona` block holds overrides, not a full copy of run.persona.
    data["personas"] = [{"name": p.name} | p.model_dump(mode="json", exclude_none=True, exclude_unset=True)
                        for p in cfg.personas]
    out = [_HEADER.format(dir=dir_label)] + _run_section(cfg.run)
    for key, value in data.items():
        out.append(f"# {_COMMENTS[key]}")
        out.append(yaml.safe_dump({key: value}, allow_unicode=True, sort_keys=False, width=100).rstrip())
        out.append("")
    return "\n".join(out)


def _persona_items(personas: Mapping[str, str] | list | None) -> list:
    """`{name: ollama_model or ""}` or a list of mappings/WorkspacePersona, as items to validate."""
    if not personas:
        return _default_personas()
    if isinstance(personas, Mapping):
        return [{"name": n, "ollama_model": m or None} for n, m in personas.items()]
    return list(personas)


@holds_workspace_lock("cycle init --force")  # an existing workspace only: never beside a running round
def init_workspace(path: str | Path, model: str = "qwen2.5-14b", personas: Mapping[str, str] | list | None = None,
                   force: bool = False, host: str | None = None) -> Workspace:
    """Create a workspace (commented cycle.yaml, registry, folders).

    Refuses a non-empty folder that is not a workspace. On an existing workspace, `force` writes a
    fresh cycle.yaml and keeps the old one beside it as cycle.yaml.<time>.bak; the registry,
    rounds and fixed sets are kept. Nothing is ever deleted.
    """
    path = Path(path).expanduser()
    existing = is_workspace(path)
    if path.exists() and not path.is_dir():
        raise EdentuneError(f"{path} exists and is not a folder", hint="choose another path for the workspace")
    if existing and not force:
        raise EdentuneError(f"{path} is already a cycle workspace",
                            hint="run a round with `edentune cycle run`, or use --force to rewrite its cycle.yaml (the old one is kept as a .bak)")
    if not existing and path.is_dir():
        foreign = sorted(e.name for e in path.iterdir() if e.name not in LAYOUT)
        if foreign:
            raise EdentuneError(f"{path} is not empty and is not a cycle workspace (it holds {', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''})",
                                hint="choose a new or empty folder; edentune never mixes a workspace into other files")
        if (path / CONFIG_NAME).exists() and not force:  # an init interrupted before the registry was made
            raise EdentuneError(f"{path} has a {CONFIG_NAME} but no registry",
                                hint="use --force to write a fresh cycle.yaml (the old one is kept as a .bak)")
    run = config_for_model(model)
    if (problem := model_reference_problem(run.model.name_or_path)) and problem[0] == "error":
        raise ConfigError(f"--model: {problem[1]}", hint="a preset alias (qwen2.5-14b, embedded), a hub id org/name, a model folder or a .gguf file")
    if run.preset == "embedded":  # the quickstart's measured recipe, not the bare preset
        from ..presets import quickstart_recipe

        run = run.updated(quickstart_recipe())
    if host is not None:
        from ..export.ollama import check_host

        host = check_host(host)
    try:
        cfg = WorkspaceConfig.model_validate({"run": run, "personas": _persona_items(personas), "ollama": {"host": host}})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, "cycle init")) from None
    cfg_path = path / CONFIG_NAME
    path.mkdir(parents=True, exist_ok=True)
    for sub in ("fixed", "replay", "rounds"):
        (path / sub).mkdir(exist_ok=True)
    if cfg_path.exists():
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        backup = cfg_path.with_name(f"{CONFIG_NAME}.{stamp}.bak")
        backup.write_bytes(cfg_path.read_bytes())
    text = render_workspace_yaml(cfg, str(path))
    # Written before the registry: a workspace is "made" once both exist, so an interrupted init
    # leaves a folder that a rerun completes (it holds only our own files).
    write_text_atomic(cfg_path, text)
    Registry(path / REGISTRY_NAME).close()
    return Workspace(path.resolve(), _parse(yaml.safe_load(text), str(cfg_path)))
