"""A run's data history: which mix each stretch of each stage read.

Entries are ``{"stage": index, "step": first step, "data": the mix as a dict}``: one per stage
entered, and one more each time a resumed (or rolled-back) run's config gives a stage another
mix. The past keeps the mixes it was read with, and each source continues after what they drew
(``streams.plan_segments`` reads the history back). The trainer keeps it in every checkpoint and
in ``<run_dir>/data_history.json`` (read by ``orchestration.data_sequence``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestration.config import to_dict
from orchestration.config.loading import to_data_config
from orchestration.data.streams import data_fingerprint

if TYPE_CHECKING:
    from orchestration.loop.stages import Stage


def note_mix(history: list[dict], stage: Stage, step: int) -> tuple[list[dict], bool]:
    """The history as of entering ``stage`` at ``step``, and whether the stage's mix changed.

    Entries after ``step`` (undone by a rollback) are dropped. ``stage``'s mix is recorded from
    its first step, or from ``step`` when the stage already read another mix before it (then
    the second value is True); an entry at ``step`` itself is replaced."""
    history = [e for e in history if e["step"] <= step]
    mine = [e for e in history if e["stage"] == stage.index]
    if mine and data_fingerprint(to_data_config(mine[-1]["data"])) == \
            data_fingerprint(stage.data):
        return history, False
    if mine and mine[-1]["step"] == step:
        history.remove(mine.pop())
    history.append({"stage": stage.index, "step": step if mine else stage.first_step,
                    "data": to_dict(stage.data)})
    return history, bool(mine)
