"""The MLX training engine: the torch engine's recipe, with mlx-lm doing the work (skeleton: `run.py`).

What comes from mlx / mlx-lm: model loading (`mlx_lm.utils.load`), the 4-bit base
(`mlx_lm.utils.quantize_model`, MLX's affine 4-bit: the QLoRA base on Apple GPUs, where
bitsandbytes has no kernels), LoRA layers (`mlx_lm.tuner.utils.linear_to_lora_layers`), gradient
checkpointing (`mlx_lm.tuner.trainer.grad_checkpoint`), evaluation (`mlx_lm.tuner.trainer.evaluate`),
`nn.value_and_grad`, AdamW, the LR schedules and gradient clipping (`mlx.optimizers`).

What edentune adds around them, identical to the torch path:
- the trained tokens: examples come from `data.encode` (assistant turns up to and including the
  end-of-turn token), not from mlx-lm's chat-template masking; the loss is summed over trained
  positions and divided by the trained tokens of the whole optimizer step (as `EdenTrainer`);
- the data order: the same epoch-seeded length-grouped sampler as the torch path;
- eval/save steps, early stopping, the best checkpoint, atomic checkpoints and `--resume`
  (the run folder, NaN rollback and the finish are `run.py`'s, shared with torch), metrics.jsonl / TensorBoard / progress / health warnings
  (the torch path's `MonitorCallback` and `RichProgressCallback`, driven with the same numbers);
- the adapter in PEFT layout (`mlx_adapter`), so eval, compare, export and deploy read it unchanged.

mlx-lm's own `tuner.trainer.train` loop is not used: it masks by (offset, length) rather than
per-token labels, always evaluates at step 1, and has no early stopping, best checkpoint,
optimizer-state checkpoints or resume.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edentune.errors import EdentuneError

from .mlx_adapter import load_peft_into_mlx
from .run import MLX_4BIT, MLX_GROUP_SIZE, MLX_HINT, RunDir, mlx_installed, prepare_data, quantization_summary, write_manifest

OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"  # the name transformers uses: the same `last_checkpoint` finds both
PAD_MULTIPLE = 32  # sequence lengths rounded up like mlx-lm's batches: fewer distinct shapes to compile


# -- model ----------------------------------------------------------------------------------------
def mlx_model_config(config: dict) -> dict:
    """Overrides so that mlx-lm reads a transformers-5 config.json as transformers does.

    transformers 5 writes `rope_parameters: {rope_theta, rope_type, ...}` instead of top-level
    `rope_theta` / `rope_scaling`; mlx-lm 0.32's llama and qwen2 read only the latter and would
    silently fall back to rope_theta 10000 (SmolLM2 uses 100000: logits off by up to 2.2).
    """
    rope = config.get("rope_parameters")
    if "rope_theta" in config or not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    out: dict = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def check_supported(cfg, model_dir: str) -> dict:
    """Refuse, with the reason, what the MLX backend cannot do; returns the model's config.json."""
    if cfg.model.trust_remote_code:
        raise EdentuneError("model.trust_remote_code is not supported by the MLX backend",
                            hint="edentune never runs model code from a download; use a built-in architecture")
    if not mlx_installed():
        raise EdentuneError("the MLX backend needs mlx and mlx-lm", hint=MLX_HINT)
    config_path = Path(model_dir) / "config.json"
    if not config_path.exists():
        raise EdentuneError(f"{model_dir}: the MLX backend needs a local model directory with config.json and safetensors",
                            hint="download the model first (e.g. `huggingface-cli download ID --local-dir DIR`) and set model.name_or_path to DIR")
    config = json.loads(config_path.read_text())
    from mlx_lm.utils import _get_classes

    try:
        _get_classes(config)
    except ValueError:
        raise EdentuneError(f"mlx-lm has no implementation of the {config.get('model_type')!r} architecture",
                            hint="use a supported family (llama, qwen2 and most others in mlx_lm/models) or training.backend: torch") from None
    return config


def load_mlx_model(cfg, model_dir: str, *, quantize: bool | None = None):
    """The base as mlx-lm loads it: 4-bit (QLoRA) when quantization.load_in_4bit, all weights frozen."""
    import mlx.core as mx
    from mlx_lm.utils import load, quantize_model

    config = check_supported(cfg, model_dir)
    model, _, config = load(model_dir, model_config=mlx_model_config(config), return_config=True)
    model.freeze()
    dtype = mlx_dtype(cfg)
    if dtype is not None:
        model.set_dtype(dtype)
    if cfg.quantization.load_in_4bit if quantize is None else quantize:
        mode = MLX_4BIT[cfg.quantization.quant_type]
        model, _ = quantize_model(model, config, group_size=MLX_GROUP_SIZE[mode], bits=4, mode=mode)
        model.freeze()
    mx.eval(model.parameters())
    return model


def mlx_dtype(cfg):
    """Compute dtype of the frozen base: the config's precision; fp32 on the CPU build (no fast bf16 kernels)."""
    import mlx.core as mx

    p = cfg.training.precision
    if p == "auto":
        p = cfg.quantization.compute_dtype if mx.default_device() == mx.gpu else "fp32"
    return {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}[p]


def lora_keys(model, target_modules: list[str]) -> list[str]:
    """Module paths inside one block (`self_attn.q_proj`, `mlp.down_proj`) for the configured targets."""
    keys = sorted({name for name, _ in model.layers[0].named_modules() if name.rpartition(".")[2] in target_modules})
    missing = set(target_modules) - {k.rpartition(".")[2] for k in keys}
    if missing:
        raise EdentuneError(f"lora.target_modules {sorted(missing)} do not exist in this model's blocks (found {keys})")
    return keys


def add_lora(cfg, model) -> list[str]:
    """LoRA on the configured projections of every block, through mlx-lm's own conversion."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from .mlx_adapter import lora_scale

    lo = cfg.lora
    keys = lora_keys(model, lo.target_modules)
    mx.random.seed(cfg.training.seed)  # LoRA A is drawn from MLX's RNG: same seed, same adapter
    linear_to_lora_layers(model, len(model.layers), {
        "rank": lo.r, "scale": lora_scale(lo.alpha, lo.r, lo.use_rslora), "dropout": lo.dropout, "keys": keys})
    return keys


_CHECKPOINTED: set[type] = set()


def use_gradient_checkpointing(model) -> None:
    # mlx-lm's grad_checkpoint patches the block *class*; patching it twice would nest checkpoints.
    from mlx_lm.tuner.trainer import grad_checkpoint

    block = type(model.layers[0])
    if block not in _CHECKPOINTED:
        grad_checkpoint(model.layers[0])
        _CHECKPOINTED.add(block)


# -- data -----------------------------------------------------------------------------------------
def step_order(examples, cfg, epoch: int) -> list[list[list[int]]]:
    """One epoch as optimizer steps of micro-batches of example indices, in the torch path's order."""
    import torch

    from .trainer import EpochSeededLengthGroupedSampler

    t = cfg.training
    if t.batching == "padded":
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(t.seed + epoch)).tolist()
    else:  # length_grouped (packed falls back to it, as on the torch path without flash-attention)
        sampler = EpochSeededLengthGroupedSampler(t.per_device_batch_size * t.gradient_accumulation_steps,
                                                  [len(e.input_ids) for e in examples], t.seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
    bs, ga = t.per_device_batch_size, t.gradient_accumulation_steps
    micro = [order[i:i + bs] for i in range(0, len(order), bs)]
    return [micro[i:i + ga] for i in range(0, len(micro), ga)]


def collate(examples, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets): right-padded ids without the last position, labels shifted by one.

    Padding carries label -100 and sits after every real token, so under the causal mask it
    changes no trained logit (as on the torch path)."""
    from edentune.data.encode import IGNORE

    longest = max(len(e.input_ids) for e in examples)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE + 1
    ids = np.full((len(examples), width), pad_id, dtype=np.int32)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int32)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = e.input_ids
        labels[row, :len(e.labels)] = e.labels
    return ids[:, :-1], labels[:, 1:]


def output_head(model):
    """The model's output projection as a function of the final hidden states, or None.

    With it the loss computes logits at trained positions only, as the torch path does
    (`trained_token_loss`): MLX's CPU matmul is slow and a 49k-152k vocabulary makes the head
    the largest matmul of a step. It is used only when a probe shows head(body(x)) == model(x),
    so architectures that post-process logits (soft-capping, scaling) keep the full forward."""
    import mlx.core as mx

    body = getattr(model, "model", None)
    if body is None:
        return None
    if "lm_head" in model:
        head = model.lm_head
    elif hasattr(body, "embed_tokens") and hasattr(body.embed_tokens, "as_linear"):
        head = body.embed_tokens.as_linear
    else:
        return None
    probe = mx.array([[1, 2, 3, 4]])
    try:
        same = mx.allclose(head(body(probe)), model(probe), atol=1e-4).item()
    except (TypeError, ValueError, AttributeError):
        return None
    return head if same else None


def trained_positions(targets: np.ndarray) -> np.ndarray:
    """Flat indices of the positions that carry a label."""
    from edentune.data.encode import IGNORE

    return np.flatnonzero(targets.reshape(-1) != IGNORE).astype(np.int32)


def make_loss(head):
    """loss(model, inputs, targets, positions) -> (summed cross-entropy over trained positions, trained tokens)."""
    import mlx.core as mx
    import mlx.nn as nn

    from .trainer import LOGITS_CHUNK_ELEMENTS

    def ce_sum(hidden, targets):
        return nn.losses.cross_entropy(head(hidden).astype(mx.float32), mx.stop_gradient(targets)).sum()

    # Recomputed in backward, as the torch path's chunks: at most LOGITS_CHUNK_ELEMENTS logits live at once.
    ce_sum_checkpointed = mx.checkpoint(ce_sum)

    def token_loss(model, inputs, targets, positions):
        flat_targets = targets.reshape(-1)[positions]
        n = positions.size
        if head is None:
            logits = model(inputs)
            logits = logits.reshape(-1, logits.shape[-1])[positions]
            return nn.losses.cross_entropy(logits.astype(mx.float32), flat_targets).sum(), mx.array(n)
        hidden = model.model(inputs)
        hidden = hidden.reshape(-1, hidden.shape[-1])[positions]
        chunk = max(1, LOGITS_CHUNK_ELEMENTS // model.args.vocab_size) if hasattr(model, "args") else n
        if n <= chunk:
            return ce_sum(hidden, flat_targets), mx.array(n)
        total = mx.array(0.0)
        for i in range(0, n, chunk):
            total = total + ce_sum_checkpointed(hidden[i:i + chunk], flat_targets[i:i + chunk])
        return total, mx.array(n)

    return token_loss


# -- the run --------------------------------------------------------------------------------------
@dataclass
class RunState:
    """What a checkpoint records besides the weights (trainer_state.json)."""

    global_step: int = 0
    epoch: float = 0.0
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    patience: int = 0
    trained_tokens: int = 0
    learning_rate: float = 0.0
    evals: list = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> RunState:
        return cls(**json.loads(path.read_text()))


class MlxRun:
    def __init__(self, cfg, model, model_dir: str, keys: list[str], tokenizer, train_set, val_set, run_dir: Path, tb_writer, console):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        self.cfg, self.model, self.model_dir, self.keys = cfg, model, model_dir, keys
        self.train_set, self.val_set = train_set, val_set
        self.run_dir, self.tb, self.console = run_dir, tb_writer, console
        self.hooks: list = []  # the torch path's TrainerCallbacks (monitor, progress, the caller's), set per attempt
        self._order: tuple[int, list] = (-1, [])
        self.loss = make_loss(output_head(model))
        t = cfg.training
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.steps_per_epoch = math.ceil(math.ceil(len(train_set) / t.per_device_batch_size) / t.gradient_accumulation_steps)
        self.max_steps = t.max_steps or math.ceil(t.num_epochs * self.steps_per_epoch)
        self.state = RunState()
        self.control = SimpleNamespace(should_training_stop=False)
        self.non_finite: str | None = None
        self.initial_lora = [(k, mx.array(v)) for k, v in tree_flatten(model.trainable_parameters())]

    # -- hooks (the torch path's callbacks, driven with this run's numbers) ------------------
    def _hook_state(self):
        s = self.state
        return SimpleNamespace(global_step=s.global_step, epoch=s.epoch, max_steps=self.max_steps,
                               is_world_process_zero=True, best_metric=s.best_metric)

    def _call(self, event: str, **kw) -> None:
        state = self._hook_state()
        for hook in self.hooks:
            fn = getattr(hook, event, None)
            if fn is not None:
                fn(None, state, self.control, **kw)

    def _log(self, logs: dict) -> None:
        from transformers.integrations.integration_utils import rewrite_logs

        self._call("on_log", logs=logs)
        for k, v in rewrite_logs(logs).items():
            if isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(k, v, self.state.global_step)

    # -- optimizer --------------------------------------------------------------------------
    def make_optimizer(self, base_lr: float):
        import mlx.core as mx
        import mlx.optimizers as optim

        t = self.cfg.training
        decay_steps = max(1, self.max_steps - t.warmup_steps)
        # The transformers schedules (get_cosine/linear/constant_schedule_with_warmup), from MLX's
        # schedulers: mlx-lm's build_schedule joins its warmup one step later than transformers does.
        main = {"cosine": lambda: optim.cosine_decay(base_lr, decay_steps, 0.0),
                "linear": lambda: optim.linear_schedule(base_lr, 0.0, decay_steps),
                "constant_with_warmup": lambda: (lambda step: mx.array(base_lr))}[t.lr_scheduler]()
        schedule = (optim.join_schedules([optim.linear_schedule(0.0, base_lr, t.warmup_steps), main], [t.warmup_steps])
                    if t.warmup_steps else main)
        # 8-bit optimizers are bitsandbytes (torch) only: MLX's AdamW keeps fp32 moments, which for
        # LoRA parameters is a small amount of memory (the planner counts it).
        self.optimizer = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.999], eps=1e-8, weight_decay=t.weight_decay)
        self.optimizer.init(self.model.trainable_parameters())
        self.base_lr = base_lr

    # -- checkpoints ------------------------------------------------------------------------
    def adapter_weights(self) -> dict:
        from mlx.utils import tree_flatten

        return dict(tree_flatten(self.model.trainable_parameters()))

    def write_adapter(self, out: Path) -> None:
        """PEFT layout at `out` (what the rest of edentune reads), mlx-lm's own layout in `out/mlx`."""
        from .mlx_adapter import MLX_SUBDIR, lora_scale, write_mlx_adapter, write_peft_adapter

        import mlx.core as mx

        lo = self.cfg.lora
        weights = {k: np.array(v.astype(mx.float32)) for k, v in self.adapter_weights().items()}
        base = self.model_dir
        write_peft_adapter(out, weights, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.target_modules,
                           use_rslora=lo.use_rslora, base_model=base)
        write_mlx_adapter(out / MLX_SUBDIR, weights, num_layers=len(self.model.layers), rank=lo.r,
                          scale=lora_scale(lo.alpha, lo.r, lo.use_rslora), dropout=lo.dropout, keys=self.keys, base_model=base)

    def save_checkpoint(self) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from transformers.trainer_utils import rotate_checkpoints

        from edentune.io import atomic_dir

        s, t = self.state, self.cfg.training
        path = self.run_dir / f"checkpoint-{s.global_step}"
        if s.best_global_step is not None and (s.best_global_step == s.global_step or (self.run_dir / f"checkpoint-{s.best_global_step}").exists()):
            s.best_model_checkpoint = str(self.run_dir / f"checkpoint-{s.best_global_step}")
        with atomic_dir(path) as tmp:
            self.write_adapter(tmp)
            opt = {f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)}
            mx.save_safetensors(str(tmp / OPTIMIZER_STATE), opt)
            (tmp / TRAINER_STATE).write_text(json.dumps(vars(s), indent=2) + "\n")
        rotate_checkpoints(str(self.run_dir), save_total_limit=t.save_total_limit,
                           best_model_checkpoint=s.best_model_checkpoint, use_mtime=False)
        self.reseed()

    def reseed(self) -> None:
        # MLX's global key cannot be set from a saved value, so the dropout RNG is re-seeded from
        # (seed, step) at every checkpoint: a run resumed there draws the same masks as one that went on.
        import mlx.core as mx

        mx.random.seed(self.cfg.training.seed * 1_000_003 + self.state.global_step)

    def load_lora(self, checkpoint: Path) -> None:
        import mlx.core as mx

        from .mlx_adapter import MLX_SUBDIR, MLX_WEIGHTS

        weights = mx.load(str(checkpoint / MLX_SUBDIR / MLX_WEIGHTS))
        self.model.load_weights(list(weights.items()), strict=False)
        mx.eval(self.model.parameters())

    def restore(self, checkpoint: str | None, base_lr: float) -> None:
        """Weights, optimizer, RNG and counters of `checkpoint`; or the initial adapter when None."""
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        self.make_optimizer(base_lr)
        self.non_finite = None
        self.control.should_training_stop = False
        if checkpoint is None:
            self.model.load_weights(self.initial_lora, strict=False)
            self.state = RunState()
            return
        path = Path(checkpoint)
        if not (path / OPTIMIZER_STATE).exists():
            raise EdentuneError(f"{path} was not written by the MLX backend (no {OPTIMIZER_STATE})",
                                hint="resume it with the backend that wrote it (training.backend: torch), or start a new training.output_dir")
        self.load_lora(path)
        saved = mx.load(str(path / OPTIMIZER_STATE))
        self.optimizer.state = tree_unflatten([(k.removeprefix("optimizer."), v) for k, v in saved.items()])
        self.state = RunState.load(path / TRAINER_STATE)
        self.reseed()

    # -- evaluation -------------------------------------------------------------------------
    def _batches(self, dataset, batch_size, max_seq_length=None, loop=False, seed=None, comm_group=None):
        """Validation batches in the call signature of mlx-lm's `iterate_batches` (its evaluate() calls it)."""
        import mlx.core as mx

        ordered = sorted(dataset, key=lambda e: len(e.input_ids))
        for i in range(0, len(ordered), batch_size):
            inputs, targets = collate(ordered[i:i + batch_size], self.pad_id)
            yield mx.array(inputs), mx.array(targets), mx.array(trained_positions(targets))

    def evaluate(self) -> float:
        from mlx_lm.tuner.trainer import evaluate

        def mean_loss(model, *batch):  # the (mean, tokens) pair mlx-lm's evaluate() expects
            total, n = self.loss(model, *batch)
            return total / n, n

        loss = evaluate(self.model, self.val_set, batch_size=self.cfg.training.per_device_batch_size, num_batches=-1,
                        max_seq_length=self.cfg.model.max_seq_len, loss=mean_loss, iterate_batches=self._batches)
        self.model.train()
        return loss

    # -- training ---------------------------------------------------------------------------
    def run(self) -> None:
        """Train until max_steps, early stopping or a non-finite loss/gradient (then `non_finite` is set)."""
        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx.utils import tree_map

        t = self.cfg.training
        has_eval = bool(self.val_set)
        early = has_eval and t.early_stopping_patience and t.load_best_model_at_end
        def step_loss_fn(model, inputs, targets, positions, denom):
            # Divided by the trained tokens of the whole optimizer step (all micro-batches), like
            # EdenTrainer with num_items_in_batch: the summed gradients are the step's per-token mean.
            total, n = self.loss(model, inputs, targets, positions)
            return total / denom, n

        loss_and_grad = nn.value_and_grad(self.model, step_loss_fn)
        self.model.train()
        self._call("on_train_begin")
        window_losses: list[float] = []
        while self.state.global_step < self.max_steps and not self.control.should_training_stop:
            step = self.state.global_step
            epoch, index = divmod(step, self.steps_per_epoch)
            if self._order[0] != epoch:
                self._order = (epoch, step_order(self.train_set, self.cfg, epoch))
            micro_batches = self._order[1][index]
            batches = [collate([self.train_set[i] for i in mb], self.pad_id) for mb in micro_batches]
            positions = [trained_positions(y) for _, y in batches]
            denom = max(1, sum(p.size for p in positions))
            self._call("on_step_begin")
            grads, step_loss = None, 0.0
            for (inputs, targets), pos in zip(batches, positions):
                (loss, _), g = loss_and_grad(self.model, mx.array(inputs), mx.array(targets), mx.array(pos), mx.array(float(denom)))
                grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
                mx.eval(loss, grads)
                step_loss += loss.item()
            self.state.trained_tokens += denom
            grads, grad_norm = optim.clip_grad_norm(grads, t.max_grad_norm)
            grad_norm = grad_norm.item()
            if not math.isfinite(step_loss) or not math.isfinite(grad_norm):
                # Nothing computed after a NaN/Inf step may be logged, evaluated or saved as "good".
                what = f"loss {step_loss}" if not math.isfinite(step_loss) else f"gradient norm {grad_norm}"
                self.non_finite = f"{what} at step {step + 1}"
                return
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.parameters(), self.optimizer.state)
            lr = float(self.optimizer.learning_rate)  # the schedule's value for the update just made
            self.state.global_step = step + 1
            self.state.epoch = self.state.global_step / self.steps_per_epoch
            self.state.learning_rate = lr
            window_losses.append(step_loss)
            self._call("on_step_end")
            if self.state.global_step % t.logging_steps == 0:
                self._log({"loss": sum(window_losses) / len(window_losses), "grad_norm": grad_norm, "learning_rate": lr})
                window_losses = []
            if has_eval and self.state.global_step % t.eval_steps == 0:
                self._evaluate_step(early)
            final = self.state.global_step >= self.max_steps or self.control.should_training_stop
            if self.state.global_step % t.save_steps == 0 or final:
                self.save_checkpoint()
        self._call("on_train_end")

    def _evaluate_step(self, early: bool) -> None:
        s = self.state
        val = self.evaluate()
        self._log({"eval_loss": val, "eval_perplexity": math.exp(min(val, 50.0))})
        s.evals.append([s.global_step, val])
        if s.best_metric is None or val < s.best_metric:
            s.best_metric, s.best_global_step, s.patience = val, s.global_step, 0
        else:
            s.patience += 1
            if early and s.patience >= self.cfg.training.early_stopping_patience:
                self.console.print(f"early stopping at step {s.global_step}: validation loss has not improved for {s.patience} evaluations")
                self.control.should_training_stop = True


class MlxEngine:
    """SFT with mlx-lm's LoRA layers (`MlxRun`): the torch engine's inputs and outputs."""

    output_key, label, main = "training.output_dir", "", True

    def __init__(self, cfg, *, init_adapter: str | Path | None = None, callbacks: list | tuple = (), console=None,
                 fresh_optimizer: bool = False):
        from rich.console import Console

        from edentune.models import resolve_model_dir

        self.cfg, self.init_adapter, self.callbacks = cfg, init_adapter, callbacks
        self.console = console or Console(stderr=True)
        self.run = RunDir(cfg.training.output_dir)
        self.model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.architecture)
        check_supported(cfg, self.model_dir)  # before touching the run directory
        if init_adapter is not None:
            check_init_adapter(cfg, init_adapter)
        if fresh_optimizer:
            self.console.print("note: --fresh-optimizer is not needed on the MLX backend: every MLX checkpoint holds the optimizer state")
        self.tb_writer = None

    def resume_checkpoint(self) -> str | None:
        return self.run.last_checkpoint()

    def prepare(self, checkpoint: str | None) -> dict:
        import mlx.core as mx
        from torch.utils.tensorboard import SummaryWriter

        from edentune.models import load_tokenizer

        cfg, t, console = self.cfg, self.cfg.training, self.console
        self.tokenizer = load_tokenizer(self.model_dir, cfg.model.trust_remote_code)
        train_set, val_set, self.data_stats = prepare_data(cfg, self.tokenizer, console)
        if t.batching == "packed":
            console.print("packing is not available on the MLX backend: using length-grouped batches instead")
        if "8bit" in t.optimizer:
            console.print(f"note: {t.optimizer} is a bitsandbytes (torch) optimizer; the MLX backend uses AdamW with fp32 moments")
        if cfg.quantization.load_in_4bit:
            console.print(f"{quantization_summary(cfg, 'mlx')} (the MLX counterpart of bitsandbytes "
                          f"{cfg.quantization.quant_type}; double quantization does not apply)")
        device = f"mlx-{'gpu' if mx.default_device() == mx.gpu else 'cpu'}"
        model = load_mlx_model(cfg, self.model_dir)
        keys = add_lora(cfg, model)
        if self.init_adapter is not None:
            load_peft_into_mlx(model, self.init_adapter)  # before MlxRun records the initial LoRA a rollback returns to
        if t.gradient_checkpointing:
            use_gradient_checkpointing(model)
        dtype = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}[mlx_dtype(cfg)]
        write_manifest(self.run, cfg, self.tokenizer, device, dtype, self.data_stats, resumed=checkpoint is not None)
        self.tb_writer = SummaryWriter(str(self.run.tensorboard_dir))
        self.mlx_run = MlxRun(cfg, model, self.model_dir, keys, self.tokenizer, train_set, val_set, self.run.path, self.tb_writer, console)
        self.has_eval = bool(val_set)
        return {"data": self.data_stats, "device": device}

    def fit(self, checkpoint: str | None, lr: float | None) -> str | None:
        from .monitor import MonitorCallback, RichProgressCallback
        from .trackers import TrackerCallback

        run, t = self.mlx_run, self.cfg.training
        run.restore(checkpoint, lr or t.learning_rate)
        progress = RichProgressCallback(self.console)
        run.hooks = [MonitorCallback(self.metrics_log, lambda: run.state.trained_tokens, t.max_grad_norm, self.console), progress,
                     TrackerCallback(self.tracking), *self.callbacks]
        try:
            run.run()
        finally:
            progress.close()
        return run.non_finite

    def base_lr(self) -> float:
        return self.mlx_run.base_lr

    def finish(self) -> dict:
        run, s = self.mlx_run, self.mlx_run.state
        best = Path(s.best_model_checkpoint) if s.best_model_checkpoint else None
        if self.cfg.training.load_best_model_at_end and best is not None and best.exists():
            run.load_lora(best)
        final_eval = None
        if self.has_eval:
            final_eval = run.evaluate()
            run._log({"eval_loss": final_eval, "eval_perplexity": math.exp(min(final_eval, 50.0))})
        return {
            "global_step": s.global_step, "max_steps": run.max_steps, "epoch": s.epoch,
            "stopped_early": s.global_step < run.max_steps, "best_checkpoint": str(best) if best else None,
            "best_eval_loss": s.best_metric, "final_eval_loss": final_eval,
            "final_eval_perplexity": math.exp(min(final_eval, 50.0)) if final_eval is not None else None,
            "trained_tokens": s.trained_tokens, "data": self.data_stats, "backend": "mlx",
        }

    def write_adapter(self, folder: Path) -> None:
        self.mlx_run.write_adapter(folder)

    def close(self) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()


def check_init_adapter(cfg, adapter: str | Path) -> None:
    """The MLX engine continues a PEFT adapter inside LoRA layers built from `cfg.lora`: they must agree."""
    from edentune.models import check_adapter_dir

    check_adapter_dir(adapter)
    saved = json.loads((Path(adapter) / "adapter_config.json").read_text())
    lo = cfg.lora
    want = {"r": lo.r, "lora_alpha": lo.alpha, "use_rslora": lo.use_rslora, "target_modules": sorted(lo.target_modules)}
    have = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"), "use_rslora": bool(saved.get("use_rslora")),
            "target_modules": sorted(saved.get("target_modules") or [])}
    differ = [f"{k} {have[k]} (config: {want[k]})" for k in want if have[k] != want[k]]
    if differ:
        raise EdentuneError(f"{adapter}: cannot continue this adapter on the MLX backend: {', '.join(differ)}",
                            hint="set the config's lora section to the adapter's values, or train from the base")
