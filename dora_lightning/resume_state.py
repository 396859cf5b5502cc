"""Mends to a Lightning checkpoint's loop state before a resume."""

from __future__ import annotations

from typing import Any

__all__ = ["close_finished_epoch"]


def close_finished_epoch(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written after an epoch's last batch start the next epoch afresh on resume.

    Two such states: written in the epoch's end hooks (``on_train_epoch_end``: every_n_epochs), where Lightning counts
    the epoch processed but not completed; or after the hooks (a SIGTERM stop there, ``trainer.save_checkpoint``
    after ``fit``), where the epoch is completed but the batch counter still holds the finished epoch's batches.
    With ``max_epochs`` Lightning copes with both, but with ``max_steps`` (iteration-based training) it restarts inside
    the finished epoch: one batch past its end, or the next epoch numbered from the old count. A completed epoch and a
    fresh batch count make it start the next epoch as an uninterrupted run does.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if epochs is None or batches is None:
        return
    current, total = epochs["current"], epochs["total"]
    in_end_hooks = (
        current["ready"] == current["started"] == current["processed"] == current["completed"] + 1
        and total["processed"] == total["completed"] + 1
    )
    after_end_hooks = (
        current["ready"] == current["started"] == current["processed"] == current["completed"] > 0
        and total["processed"] == total["completed"]
        and batches.get("is_last_batch") is True  # the epoch ran to its end (not a max_steps stop inside it)
    )
    if not (in_end_hooks or after_end_hooks):
        return
    current["completed"], total["completed"] = current["processed"], total["processed"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False
