"""Health detectors on synthetic loss / gradient-norm sequences."""

from __future__ import annotations

import math

from edentune.train.health import HealthMonitor, is_exploding, is_non_finite, is_overfitting, is_underfitting


def test_overfitting_val_rising_while_train_falls():
    assert is_overfitting(train=[2.0, 1.5, 1.0, 0.6], val=[1.9, 1.7, 1.8, 1.95])
    assert not is_overfitting(train=[2.0, 1.8, 1.7, 1.6], val=[1.9, 1.8, 1.75, 1.7])
    assert not is_overfitting(train=[2.0, 2.1, 2.2, 2.3], val=[1.9, 1.7, 1.8, 1.95])  # both rising: not overfitting


def test_overfitting_large_gap():
    assert is_overfitting(train=[0.3], val=[1.2])
    assert not is_overfitting(train=[1.0], val=[1.2])


def test_underfitting_high_and_flat():
    assert is_underfitting(train=[3.0, 2.99, 2.98], val=[3.1, 3.1, 3.09])
    assert not is_underfitting(train=[3.0, 2.5, 2.0], val=[3.1, 2.6, 2.1])  # still improving
    assert not is_underfitting(train=[0.9, 0.9, 0.9], val=[1.0, 1.0, 1.0])  # flat but low


def test_explosion_repeated_large_grad_norm_or_loss_spike():
    assert is_exploding([0.5, 3.0, 4.0, 5.0], [1.0] * 4, max_grad_norm=1.0)
    assert not is_exploding([3.0, 0.5, 4.0, 0.7], [1.0] * 4, max_grad_norm=1.0)
    assert is_exploding([0.5] * 7, [1.0, 1.1, 0.9, 1.0, 1.0, 1.0, 3.5], max_grad_norm=1.0)
    assert not is_exploding([0.5] * 7, [1.0, 1.1, 0.9, 1.0, 1.0, 1.0, 1.2], max_grad_norm=1.0)


def test_non_finite():
    assert is_non_finite(math.nan) and is_non_finite(math.inf) and not is_non_finite(1.0) and not is_non_finite(None)


def test_monitor_reports_each_finding_once_with_remedy():
    mon = HealthMonitor(max_grad_norm=1.0)
    found = [f for g in (2.0, 3.0, 4.0, 5.0) for f in mon.on_train_log(1.0, g)]
    assert [f.kind for f in found] == ["gradient_explosion"] and "learning_rate" in found[0].remedy
    found = []
    for train, val in ((2.0, 1.9), (1.5, 1.7), (1.0, 1.8), (0.6, 1.95), (0.4, 2.1)):
        mon.on_train_log(train, 0.5)
        found += mon.on_eval(val)
    assert [f.kind for f in found] == ["overfitting"]


def test_overfitting_names_the_sign_that_fired():
    assert is_overfitting(train=[2.0, 1.5, 1.0, 0.6], val=[1.9, 1.7, 1.8, 1.95]) == "rising"
    assert is_overfitting(train=[0.9, 0.5, 0.3], val=[1.4, 1.3, 1.2]) == "gap"
    mon = HealthMonitor(max_grad_norm=1.0)
    found = []
    for train, val in ((0.9, 1.4), (0.5, 1.3), (0.3, 1.2)):  # validation loss falls, but stays far above training
        mon.on_train_log(train, 0.5)
        found += mon.on_eval(val)
    assert [f.kind for f in found] == ["overfitting"]
    assert "rising" not in found[0].message and "far above training loss" in found[0].message
