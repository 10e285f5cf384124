"""Live training-health detectors: small pure functions over the logged history.

Each detector looks at plain lists of numbers (oldest first) and says whether its condition holds;
`HealthMonitor` feeds them and reports each finding once, with the remedy the guide gives.
Thresholds are deliberately conservative: a warning that fires on every healthy run gets ignored.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Finding:
    kind: str
    message: str
    remedy: str

    def __str__(self) -> str:
        return f"{self.message} -> {self.remedy}"


def is_non_finite(value: float | None) -> bool:
    return value is not None and not math.isfinite(value)


OVERFITTING = {
    "rising": "validation loss is rising while training loss falls",
    "gap": "validation loss is far above training loss",
}


def is_overfitting(train: list[float], val: list[float], rising: int = 2, gap_ratio: float = 1.5) -> str | None:
    """Which sign of overfitting shows (a key of OVERFITTING), None when neither: validation loss
    rose for `rising` consecutive evals while training loss fell ("rising"), or val >> train ("gap").

    `train[i]` is the training loss logged closest to eval `i`.
    """
    if len(val) > rising and len(train) >= len(val):
        v, t = val[-rising - 1 :], train[len(val) - rising - 1 : len(val)]
        if all(b > a for a, b in zip(v, v[1:])) and t[-1] < t[0]:
            return "rising"
    if val and train and train[-1] > 0 and val[-1] / train[-1] > gap_ratio and val[-1] - train[-1] > 0.3:
        return "gap"
    return None


def is_underfitting(train: list[float], val: list[float], high: float = 2.0, window: int = 3, flat: float = 0.02) -> bool:
    """Both losses high (> `high` nats: perplexity > 7) and flat (< `flat` relative change over `window` evals)."""
    if len(val) < window or len(train) < window:
        return False

    def stuck(xs: list[float]) -> bool:
        recent = xs[-window:]
        return min(recent) > high and (recent[0] - recent[-1]) / recent[0] < flat

    return stuck(train) and stuck(val)


def is_exploding(grad_norms: list[float], losses: list[float], max_grad_norm: float, repeats: int = 3, spike: float = 2.0) -> bool:
    """Pre-clip grad norm above the clipping threshold `repeats` logs in a row, or a loss spike (> `spike` x recent median)."""
    if len(grad_norms) >= repeats and all(g > max_grad_norm for g in grad_norms[-repeats:]):
        return True
    if len(losses) >= 6:
        return losses[-1] > spike * statistics.median(losses[-6:-1])
    return False


@dataclass
class HealthMonitor:
    max_grad_norm: float
    train_loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_at_eval: list[float] = field(default_factory=list)
    reported: set[str] = field(default_factory=set)

    def on_train_log(self, loss: float, grad_norm: float | None) -> list[Finding]:
        self.train_loss.append(loss)
        if grad_norm is not None:
            self.grad_norm.append(grad_norm)
        if is_exploding(self.grad_norm, self.train_loss, self.max_grad_norm):
            return self._once(Finding(
                "gradient_explosion",
                f"gradient norm repeatedly above max_grad_norm={self.max_grad_norm:g} or a loss spike",
                "lower training.learning_rate (halve it), keep max_grad_norm at 1.0, raise warmup_steps",
            ))
        return []

    def on_eval(self, val_loss: float) -> list[Finding]:
        self.val_loss.append(val_loss)
        if self.train_loss:
            self.train_at_eval.append(self.train_loss[-1])
        found = []
        sign = is_overfitting(self.train_at_eval, self.val_loss)
        if sign:  # the message names the sign that fired: a falling validation loss is never called rising
            found += self._once(Finding(
                "overfitting", OVERFITTING[sign],
                "fewer epochs, lower lora.r, more or more varied data; early stopping keeps the best checkpoint",
            ))
        if is_underfitting(self.train_at_eval, self.val_loss):
            found += self._once(Finding(
                "underfitting", "training and validation loss are both high and flat",
                "raise training.learning_rate within the preset's range, train longer, or raise lora.r",
            ))
        return found

    def _once(self, finding: Finding) -> list[Finding]:
        if finding.kind in self.reported:
            return []
        self.reported.add(finding.kind)
        return [finding]


def diverged_error(reason: str, rollbacks: int):
    """The error when NaN/Inf came back after every allowed rollback (both training backends)."""
    from edentune.errors import EdentuneError

    return EdentuneError(f"training diverged ({reason}) after {rollbacks} rollback(s)",
                         hint="lower training.learning_rate, raise warmup_steps, check the data for extreme examples")
