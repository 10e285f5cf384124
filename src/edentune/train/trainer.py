"""transformers' Trainer with the few behaviours it lacks, each a small override.

- checkpoints appear atomically (Trainer writes them file by file in place),
- the length-grouped order is seeded per epoch (so `--resume` replays the same order),
- the loss is computed on trained positions only, logits in bounded chunks (`trained_token_loss`),
- evaluation loss is the mean over trained tokens (Trainer averages per-batch means),
- trained (label != -100) tokens are counted for tokens/s,
- a non-finite loss or gradient stops training before anything is logged, evaluated or saved,
  so the recipe can roll back to the last good checkpoint with a lower learning rate.
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils.checkpoint import checkpoint
from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import rotate_checkpoints

from edentune.io import atomic_dir

from .data import IGNORE

TRAINER_STATE = "trainer_state.json"
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
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.get_output_embeddings()
    body_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    mask = body_inputs.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        # Right padding under a causal mask: real tokens never see the padding after them, and
        # padding positions carry no label, so the padding mask changes no trained logit. Without
        # it, SDPA takes its fused causal kernel instead of materialising batch x heads x s x s
        # scores (measured on 2 CPU cores: less memory and faster; see docs/benchmarks.md).
        body_inputs.pop("attention_mask")
    # No cache: with one, transformers stops detecting packed sequences from position_ids and the
    # sequences of a packed batch would attend to each other (tests/train/test_train_packing.py).
    hidden = causal_lm.get_decoder()(**body_inputs, use_cache=False).last_hidden_state
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE
    h, t = hidden[:, :-1][keep], targets[keep]
    n = int(t.numel())
    if getattr(causal_lm, "edentune_liger", False) and h.is_cuda:
        # Liger's fused linear cross-entropy: projection and loss in one chunked kernel that writes the
        # input gradient during the forward, so no logits chunk is kept for backward.
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, h.to(head.weight.dtype), t, head.bias), n
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // head.weight.shape[0])
    if n <= chunk:
        return _ce_sum(h, t, head.weight, head.bias), n
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        total = total + checkpoint(_ce_sum, h[i:i + chunk], t[i:i + chunk], head.weight, head.bias, use_reentrant=False)
    return total, n


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
    def __init__(self, *args, length_grouped: bool = True, rollback_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.length_grouped = length_grouped
        self.rollback_lr = rollback_lr  # set when resuming after a NaN: replaces the checkpoint's LR
        self.trained_tokens = 0
        self.non_finite: str | None = None  # what went non-finite, and at which step
        self._eval_loss_sum = self._eval_tokens = 0.0

    # -- data order --------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        if not self.length_grouped:
            return super()._get_train_sampler(train_dataset)  # random order (seeded per epoch by accelerate)
        ds = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [len(ids) for ids in ds["input_ids"]]
        # Groups span one optimizer step's micro-batches so padding is minimal within each.
        size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return EpochSeededLengthGroupedSampler(size, lengths, self.args.seed)

    # -- training step: token count and NaN/Inf detection ----------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.trained_tokens += int((inputs["labels"][:, 1:] != IGNORE).sum())
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
        loss_sum, n = trained_token_loss(model, inputs)
        if not model.training:
            self._eval_loss_sum += float(loss_sum)
            self._eval_tokens += n
        # With num_items_in_batch (all micro-batches of the optimizer step), Trainer expects the
        # loss pre-normalised for gradient accumulation; without it, a per-token mean.
        loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else max(n, 1))
        return (loss, {"loss": loss}) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        self._eval_loss_sum = self._eval_tokens = 0.0
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._eval_tokens:
            loss = self._eval_loss_sum / self._eval_tokens
            output.metrics[f"{metric_key_prefix}_loss"] = loss
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 50.0))
        return output

    # -- atomic checkpoints ----------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        # Same content as Trainer._save_checkpoint, but built under a temporary name and renamed into
        # place: a kill mid-save leaves no half-written checkpoint-N for `--resume` to pick up.
        run_dir = self.args.output_dir
        step = self.state.global_step
        self.store_flos()
        if self.state.best_global_step:
            best = os.path.join(run_dir, f"checkpoint-{self.state.best_global_step}")
            if self.state.best_global_step == step or os.path.exists(best):
                self.state.best_model_checkpoint = best
        with atomic_dir(os.path.join(run_dir, f"checkpoint-{step}")) as tmp:
            self.save_model(str(tmp), _internal_call=True)
            self._save_optimizer_and_scheduler(str(tmp))
            self._save_scaler(str(tmp))
            self._save_rng_state(str(tmp))
            for cb in [*self.callback_handler.callbacks, self.control]:
                if isinstance(cb, ExportableState):
                    self.state.stateful_callbacks[type(cb).__name__] = cb.state()
            self.state.save_to_json(str(tmp / TRAINER_STATE))
        rotate_checkpoints(run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
