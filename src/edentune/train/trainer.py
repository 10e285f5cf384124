"""transformers' Trainer with the few behaviours it lacks, each a small override.

- checkpoints appear atomically (Trainer writes them file by file in place),
- the length-grouped order is seeded per epoch (so `--resume` replays the same order),
- the loss is computed on trained positions only, logits in bounded chunks (`trained_token_loss`),
  and normalised by the optimizer step's trained tokens summed over micro-batches and processes,
- with `training.offload_checkpoints` (CUDA), the forward's saved layer inputs wait in host RAM (`offload`),
- evaluation loss is the mean over trained tokens (Trainer averages per-batch means),
- trained (label != -100) tokens are counted (for tokens/s and result.json) and kept in checkpoints,
- resuming a checkpoint at max_steps trains no further step (Trainer trains one more when that
  checkpoint lies mid-epoch),
- a non-finite loss or gradient stops training before anything is logged, evaluated or saved,
  so the recipe can roll back to the last good checkpoint with a lower learning rate.

Under `accelerate launch` (DDP, FSDP) every process runs this trainer; the NaN/Inf verdict and the
evaluation loss are reduced across processes so all ranks take the same decisions, and checkpoints
are assembled by all ranks in one temporary folder that the main process renames into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import rotate_checkpoints

from edentune.io import atomic_dir

from edentune.data.encode import IGNORE
from .offload import offloaded_activations

TRAINER_STATE = "trainer_state.json"
EDENTUNE_STATE = "edentune_state.json"  # in each checkpoint: what Trainer's own state lacks (trained tokens)
LOGITS_CHUNK_ELEMENTS = 2**26  # logits computed at once: 256 MB in fp32, whatever the vocabulary


def _ce_sum(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def trained_token_loss(model, inputs: dict) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over trained positions, with logits computed for those positions only.

    HF's default loss materialises fp32 logits for every position (~13.6 bytes x tokens x vocab:
    17 GB for Qwen2.5 at 4 x 2048, see train/plan.py) although system/user/padding positions are never
    trained. Here the decoder's hidden states are gathered at the trained positions first, and the
    output projection + cross-entropy run in chunks that are recomputed in backward
    (checkpointed), so the logits never exceed LOGITS_CHUNK_ELEMENTS at a time.
    """
    liger = getattr(_causal_lm(model), "edentune_liger", False)

    def summed(h, t, rows, head):
        if liger and h.is_cuda:
            # Liger's fused linear cross-entropy: projection and loss in one chunked kernel that writes
            # the input gradient during the forward, so no logits chunk is kept for backward.
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, h.to(head.weight.dtype), t, head.bias)
        chunk = max(1, LOGITS_CHUNK_ELEMENTS // head.weight.shape[0])
        if t.numel() <= chunk:
            return _ce_sum(h, t, head.weight, head.bias)
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, int(t.numel()), chunk):
            total = total + checkpoint(_ce_sum, h[i:i + chunk], t[i:i + chunk], head.weight, head.bias, use_reentrant=False)
        return total

    total = _on_trained_positions(model, inputs, summed)
    return total, int((inputs["labels"][:, 1:] != IGNORE).sum())


def per_row_trained_token_loss(model, inputs: dict) -> torch.Tensor:
    """[batch, 2]: each row's summed cross-entropy over its trained positions and their count
    (evaluation, no gradient). Per row so that accelerate's `gather_for_metrics` can drop the
    rows it duplicated to even out the last batch across processes."""
    def per_row(h, t, rows, head):
        batch = inputs["labels"].shape[0]
        sums = torch.zeros(batch, dtype=torch.float32, device=h.device)
        chunk = max(1, LOGITS_CHUNK_ELEMENTS // head.weight.shape[0])
        for i in range(0, int(t.numel()), chunk):
            logits = torch.nn.functional.linear(h[i:i + chunk].to(head.weight.dtype), head.weight, head.bias).float()
            sums.index_add_(0, rows[i:i + chunk], torch.nn.functional.cross_entropy(logits, t[i:i + chunk], reduction="none"))
        return torch.stack([sums, torch.bincount(rows, minlength=batch).to(torch.float32)], dim=1)

    return _on_trained_positions(model, inputs, per_row)


def _causal_lm(model):
    """The transformers model inside DDP's wrapper (`.module`; FSDP2 shards in place) and PEFT's."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _on_trained_positions(model, inputs: dict, fn):
    """`fn(hidden, targets, rows, lm_head)` at the trained positions, computed inside the model's forward.

    The model is called as a whole (through a DDP/FSDP wrapper when there is one: calling its
    decoder directly would skip the wrapper's gradient synchronisation and FSDP's gathering of
    sharded weights) with `logits_to_keep=1`, so its own head projects one position per row.
    Hooks take the decoder's last hidden state and run `fn` while the head's weights are
    available; the result is returned as the forward's `loss`, so that FSDP's backward hooks,
    which watch the forward's outputs, also cover the chunks recomputed in backward.
    """
    causal_lm = _causal_lm(model)
    body_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    mask = body_inputs.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        # Right padding under a causal mask: real tokens never see the padding after them, and
        # padding positions carry no label, so the padding mask changes no trained logit. Without
        # it, SDPA takes its fused causal kernel instead of materialising batch x heads x s x s
        # scores (measured on 2 CPU cores: less memory and faster; see docs/benchmarks.md).
        body_inputs.pop("attention_mask")
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE
    captured = {}

    def take_hidden(module, args, output):
        captured["hidden"] = output.last_hidden_state

    def compute(module, args, output):
        h = captured.pop("hidden")[:, :-1][keep]
        output["loss"] = fn(h, targets[keep], keep.nonzero()[:, 0], module.get_output_embeddings())
        return output

    hooks = [causal_lm.get_decoder().register_forward_hook(take_hidden), causal_lm.register_forward_hook(compute)]
    try:
        # No cache: with one, transformers stops detecting packed sequences from position_ids and the
        # sequences of a packed batch would attend to each other (tests/train/test_train_packing.py).
        return model(**body_inputs, logits_to_keep=1, use_cache=False).loss
    finally:
        for hook in hooks:
            hook.remove()


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped shuffling drawn from (seed, epoch) only, not from the global RNG.

    Trainer's own sampler uses the global RNG at the time an epoch starts, which differs between
    an uninterrupted run and one resumed mid-run: resuming would then see a different data order.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:  # accelerate calls this at the start of each epoch
        self.generator.manual_seed(self.seed + epoch)


class EdenTrainer(Trainer):
    # compute_loss divides by the whole optimizer step's trained tokens: Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, length_grouped: bool = True, rollback_lr: float | None = None,
                 offload_checkpoints: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.length_grouped = length_grouped
        self.offload_checkpoints = offload_checkpoints  # saved layer inputs wait in host RAM (train.offload)
        self.rollback_lr = rollback_lr  # set when resuming after a NaN: replaces the checkpoint's LR
        self.trained_tokens = 0  # over all processes, restored from the checkpoint on resume/rollback
        self.non_finite: str | None = None  # what went non-finite, and at which step
        self._eval_rows: list[torch.Tensor] = []

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, str | os.PathLike):
            saved = Path(resume_from_checkpoint) / EDENTUNE_STATE
            # Older checkpoints lack the file: the count then restarts (it only feeds reporting).
            self.trained_tokens = json.loads(saved.read_text())["trained_tokens"] if saved.exists() else 0
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs):
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs)
        if self.state.global_step >= max_steps:
            # Resumed at max_steps (a run killed between its last checkpoint and the final save, or
            # `--resume` on a finished run). Trainer checks max_steps only after an optimizer step, so
            # when that checkpoint lies mid-epoch it would train one step past max_steps each time:
            # start past the last epoch instead, so that no step runs and the run just finishes.
            return num_train_epochs, 0
        return epochs_trained, steps_trained

    # -- data order --------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        if not self.length_grouped:
            return super()._get_train_sampler(train_dataset)  # random order (seeded per epoch by accelerate)
        ds = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [len(ids) for ids in ds["input_ids"]]
        # Groups span one optimizer step's micro-batches of all processes so padding is minimal
        # within each. Every process draws the same order from (seed, epoch); accelerate's
        # BatchSamplerShard then deals consecutive micro-batches round-robin to the processes, so
        # an optimizer step trains the same examples as one process with the same global batch.
        size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.num_processes
        return EpochSeededLengthGroupedSampler(size, lengths, self.args.seed)

    # -- the optimizer step's trained tokens, over all micro-batches and processes ------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # Replaces Trainer's count, which is only global when the model forward accepts loss
        # kwargs and `average_tokens_across_devices` is on; this one always is, and it is the
        # number the per-token loss and `trained_tokens` need.
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        count = torch.tensor(local, device=device)
        if self.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        self.trained_tokens += int(count)
        return batches, count

    # -- NaN/Inf detection ---------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss) and self.non_finite is None:
            self.non_finite = f"loss {loss.item()} at step {self.state.global_step + 1}"
        return loss

    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        if norm is not None and not math.isfinite(float(norm)) and self.non_finite is None:
            self.non_finite = f"gradient norm {float(norm)} at step {self.state.global_step + 1}"
        return norm

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        if self.num_processes > 1:
            # One verdict for all processes: a NaN seen by one rank stops (and rolls back) every rank,
            # otherwise the others would wait for it forever in the next collective.
            flag = torch.tensor(1 if self.non_finite else 0, device=self.args.device)
            if int(self.accelerator.reduce(flag, reduction="sum")) and self.non_finite is None:
                self.non_finite = f"non-finite loss or gradient on another process at step {self.state.global_step}"
        if self.non_finite:
            # Nothing computed after a NaN/Inf step may be logged, evaluated or saved as "good".
            self.control.should_training_stop = True
            return
        super()._maybe_log_save_evaluate(*args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint and self.rollback_lr is not None:
            # The restored scheduler carries the LR of the failed attempt: rescale base and current LR.
            factor = self.rollback_lr / self.lr_scheduler.base_lrs[0]
            self.lr_scheduler.base_lrs = [lr * factor for lr in self.lr_scheduler.base_lrs]
            for group in self.optimizer.param_groups:
                group["lr"] *= factor
            self.lr_scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what get_last_lr() reports

    # -- loss on trained tokens only ---------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            rows = per_row_trained_token_loss(model, inputs)
            self._eval_rows.append(self.accelerator.gather_for_metrics(rows).cpu())
            loss = rows[:, 0].sum() / rows[:, 1].sum().clamp(min=1)
            return (loss, {"loss": loss}) if return_outputs else loss
        with offloaded_activations() if self.offload_checkpoints else contextlib.nullcontext():
            loss_sum, n = trained_token_loss(model, inputs)
        if num_items_in_batch is None:  # called outside the training loop: a per-token mean
            loss = loss_sum / max(n, 1)
        else:
            # num_items_in_batch: trained tokens of the whole optimizer step, all processes. DDP
            # and FSDP average gradients over processes, so the sum is scaled up by their number
            # (Trainer does the same; with it, N processes x B equals one process with N x B).
            loss = loss_sum * self.num_processes / num_items_in_batch.clamp(min=1)
        return (loss, {"loss": loss}) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        self._eval_rows = []
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._eval_rows:
            loss_sum, tokens = torch.cat(self._eval_rows).double().sum(0).tolist()
            if tokens:
                loss = loss_sum / tokens
                output.metrics[f"{metric_key_prefix}_loss"] = loss
                output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 50.0))
        return output

    # -- atomic checkpoints ----------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        # Same content as Trainer._save_checkpoint, but built under a temporary name and renamed into
        # place: a kill mid-save leaves no half-written checkpoint-N for `--resume` to pick up.
        # With several processes, the main one creates the temporary folder, every rank writes its
        # part into it (its RNG state; FSDP gathers weights and optimizer state collectively), and
        # the main process alone writes the shared files and renames the folder.
        from accelerate.utils import broadcast_object_list

        run_dir = self.args.output_dir
        step = self.state.global_step
        self.store_flos()
        if self.state.best_global_step:
            best = os.path.join(run_dir, f"checkpoint-{self.state.best_global_step}")
            if self.state.best_global_step == step or os.path.exists(best):
                self.state.best_model_checkpoint = best
        main = self.args.should_save
        with contextlib.ExitStack() as stack:
            tmp = [stack.enter_context(atomic_dir(os.path.join(run_dir, f"checkpoint-{step}"))) if main else None]
            if self.num_processes > 1:
                broadcast_object_list(tmp)
            tmp = Path(tmp[0])
            self.save_model(str(tmp), _internal_call=True)
            self._save_optimizer_and_scheduler(str(tmp))
            self._save_scaler(str(tmp))
            self._save_rng_state(str(tmp))
            if main:
                for cb in [*self.callback_handler.callbacks, self.control]:
                    if isinstance(cb, ExportableState):
                        self.state.stateful_callbacks[type(cb).__name__] = cb.state()
                self.state.save_to_json(str(tmp / TRAINER_STATE))
                (tmp / EDENTUNE_STATE).write_text(json.dumps({"trained_tokens": self.trained_tokens}) + "\n")
            self.accelerator.wait_for_everyone()  # every part written before the rename
        self.accelerator.wait_for_everyone()  # renamed before any rank looks for it (rollback, best model)
        if main:
            rotate_checkpoints(run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
