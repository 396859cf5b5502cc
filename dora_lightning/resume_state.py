"""Mends to a Lightning checkpoint's loop state before a resume."""

from __future__ import annotations

from typing import Any

__all__ = ["close_finished_epoch", "move_batch_count", "prepare_resume"]


def prepare_resume(checkpoint: dict[str, Any], datamodule: Any) -> None:
    """The mends a checkpoint needs before a resume: an epoch finished in it is closed (:func:`close_finished_epoch`)
    and, when the data module can rebase its section (``rebase_state``: a checkpoint of another layout of processes,
    loader workers and batch size; :class:`~dora_lightning.data.position.Rebased`), its section and the epoch's batch
    count are set to this layout's."""
    close_finished_epoch(checkpoint)
    rebase = getattr(datamodule, "rebase_state", None)
    key = type(datamodule).__qualname__
    if rebase is None or not isinstance(checkpoint.get(key), dict):
        return
    rebased = rebase(checkpoint[key])
    if rebased is None:
        return
    checkpoint[key] = rebased.state
    batches = rebased.loop_batches
    progress = _batch_progress(checkpoint)
    if batches is None and progress is not None and progress["current"]["processed"] > 0:
        # at an epoch's start in the data, after an epoch's last batch in Lightning's loop (a checkpoint written on
        # that batch): the finished epoch's count is this layout's, or Lightning would go on in it
        batches = rebased.batches_per_epoch
    if batches is not None:
        move_batch_count(checkpoint, batches)


def move_batch_count(checkpoint: dict[str, Any], batches: int) -> None:
    """Make Lightning's loop continue the current epoch as if ``batches`` batches of it were processed: every counter
    of its batch progress moves by the same amount, so the stage it was saved in (after a batch, at the epoch's end)
    is kept."""
    progress = _batch_progress(checkpoint)
    if progress is None:
        return
    shift = batches - progress["current"]["processed"]
    for tracker in (progress["current"], progress["total"]):
        for counter in tracker:
            tracker[counter] += shift


def close_finished_epoch(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written after an epoch's last batch start the next epoch afresh on resume.

    An epoch cut short by a stop (``trainer.should_stop``) also runs its end hooks, and a checkpoint written there
    would make Lightning skip the rest of the epoch: it is reopened instead, so that the resume continues it.

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
    if in_end_hooks and batches.get("is_last_batch") is not True:
        # the end hooks of an epoch cut short by a stop (trainer.should_stop: max_time, early stopping, the collapse
        # guard, max_steps): the epoch goes on where it stopped, not counted as processed (Lightning would start the
        # next one, skipping the rest of this one)
        current["processed"], total["processed"] = current["completed"], total["completed"]
        return
    if not (in_end_hooks or after_end_hooks):
        return
    current["completed"], total["completed"] = current["processed"], total["processed"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False


def _batch_progress(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """Lightning's batch counters of the training epoch in ``checkpoint`` (None in a checkpoint without loops)."""
    return checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
