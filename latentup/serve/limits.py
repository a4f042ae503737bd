"""What one task, one API key and one connection may cost, checked before any decoding or model work.

- ``max_prompt_chars``: a longer ``positivePrompt`` / ``negativePrompt`` is refused before the text tokenizer sees it;
- ``max_step_megapixels``: ``steps`` x the output's megapixels of one task;
- ``max_inflight_per_key`` / ``max_inflight_per_connection``: tasks accepted and not yet answered (per key: the
  unanswered claims of the taskUUID table, ``records.py``, counted there with ``InFlight`` or in Redis; per
  connection: ``InFlight``).
"""

from collections import Counter
from dataclasses import dataclass

from latentup.serve.tasks import SETTINGS, TaskError, UpscaleTask


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 2000
    max_step_megapixels: float = 400.0
    max_inflight_per_key: int = 32
    max_inflight_per_connection: int = 16

    def check_prompts(self, task: UpscaleTask) -> None:
        for api in ("positivePrompt", "negativePrompt"):
            text = task.settings.get(SETTINGS[api][0], "")
            if len(text) > self.max_prompt_chars:
                raise TaskError("invalidParameter", f"settings.{api} is {len(text)} characters, over the cap of "
                                f"{self.max_prompt_chars}: shorten it", f"settings.{api}")

    def check_cost(self, steps: int, width: int, height: int) -> None:
        """``steps`` on an input of ``width`` x ``height`` (the output is twice that a side)."""
        cost = steps * 4 * width * height / 1e6
        if cost > self.max_step_megapixels:
            raise TaskError("invalidParameter", f"{steps} steps on a {2 * width}x{2 * height} output cost "
                            f"{cost:.0f} step-megapixels, over the cap of {self.max_step_megapixels:g}: use fewer "
                            "steps or a smaller image", "settings.steps")


def too_many_running(cap: int, what: str = "API key") -> TaskError:
    return TaskError("rateLimitExceeded", f"{cap} tasks of this {what} are in flight already: wait for an answer "
                     "before sending more")


class InFlight:
    """Counts of tasks accepted and not yet answered, per key (an API key's id, or a connection)."""

    def __init__(self, cap: int, what: str):
        self.cap, self.what = cap, what
        self._counts: Counter = Counter()

    def acquire(self, key) -> None:
        if self._counts[key] >= self.cap:
            raise too_many_running(self.cap, self.what)
        self._counts[key] += 1

    def release(self, key) -> None:
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]

