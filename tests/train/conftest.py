"""Fixtures for the training tests (tiny random models, a few steps on CPU)."""

from __future__ import annotations

import random

import pytest
from train_helpers import conversation, write_jsonl


@pytest.fixture
def small_data(tmp_path) -> tuple[str, str]:
    """16 training and 4 validation conversations of varied length (5-40 reply words)."""
    rng = random.Random(0)
    train = [conversation(rng, rng.randint(5, 40)) for _ in range(16)]
    val = [conversation(rng, rng.randint(5, 20)) for _ in range(4)]
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "val.jsonl", val)
