"""Mends to a Lightning checkpoint's loop state before a resume."""

from __future__ import annotations

from typing import Any

__all__ = ["close_finished_epoch"]


def close_finished_epoch(checkpoint: dict[str, Any]) -> None:
    """Mark the epoch of a checkpoint written at its end (``on_train_epoch_end``: every_n_epochs) as completed.

    Lightning counts such an epoch processed but not completed. With ``max_epochs`` it then closes it on restart, but
    with ``max_steps`` (iteration-based training) it restarts inside it and trains one batch past its end before the
    next epoch; a completed epoch and a fresh batch count make it start the next epoch as an uninterrupted run does.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if epochs is None or batches is None:
        return
    current, total = epochs["current"], epochs["total"]
    if not (
        current["ready"] == current["started"] == current["processed"] == current["completed"] + 1
        and total["processed"] == total["completed"] + 1
    ):
        return
    current["completed"], total["completed"] = current["processed"], total["processed"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False
