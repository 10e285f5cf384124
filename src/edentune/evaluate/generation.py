"""What a backend returns per answer (its own module so that every backend can import it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Generation:
    text: str
    seconds: float  # latency the user would see for this answer
    completion_tokens: int | None = None
