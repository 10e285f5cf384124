"""What every evaluation backend returns, and the one method the runner needs of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Generation:
    text: str
    seconds: float  # latency the user would see for this answer
    completion_tokens: int | None = None


class Backend(Protocol):
    name: str

    def generate(self, conversations: list[list[dict]], max_new_tokens: int) -> list[Generation]: ...
