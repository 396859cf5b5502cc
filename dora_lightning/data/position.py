"""The clip stream's place in a checkpoint: its position, checked against the data's identity
(:mod:`dora_lightning.data.identity`) on resume, and how a run on another layout (other processes, loader workers
or batch size, the same global batch) continues the epoch.

A checkpoint's data section holds the position (epoch, batches this process has taken in it), the layout the epoch
was dealt on, the gradient accumulation, the data's identity and, when the epoch began on other layouts, its
``rest`` (:mod:`dora_lightning.data.epoch_rest`). On the checkpoint's own layout a resume skips the batches taken
and continues bit-exactly; on another one, :func:`rebase_position` rewrites the section in this layout's terms.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dora_lightning.data.epoch_rest import (
    EpochRest,
    Layout,
    Segment,
    consumed_starts,
    continue_epoch,
    emitting_workers,
    rest_batches_available,
)
from dora_lightning.data.identity import data_identity, refuse_other_data, timeline_note
from dora_lightning.data.sampling import ClipSpec

__all__ = [
    "LAYOUT_KEYS",
    "ClipStreamPosition",
    "Rebased",
    "global_batch",
    "layout_of",
    "load_rest",
    "rebase_position",
    "save_rest",
]

LAYOUT_KEYS = ("world_size", "num_workers", "batch_size", "cursors")


def layout_of(state: Mapping[str, Any]) -> Layout:
    """The layout a checkpoint's data section was saved on."""
    return Layout(*(int(state[key]) for key in LAYOUT_KEYS))


def global_batch(layout: Layout, accumulate: int) -> int:
    """Clips per optimiser step over all processes."""
    return layout.batch_size * layout.world_size * accumulate


def save_rest(rest: EpochRest) -> dict[str, Any]:
    """A checkpoint's ``rest``: the earlier parts of the epoch (layout and batches), where this layout's part began
    in the epoch's batch count, and how many batches it takes."""
    earlier = [[*(getattr(s.layout, key) for key in LAYOUT_KEYS), s.batches] for s in rest.earlier]
    return {"earlier": earlier, "start": rest.start, "batches": rest.batches}


def load_rest(saved: Mapping[str, Any] | None) -> EpochRest | None:
    """The inverse of :func:`save_rest` (None: the epoch began on this layout)."""
    if not saved:
        return None
    earlier = tuple(Segment(Layout(*map(int, part[:4])), int(part[4])) for part in saved["earlier"])
    return EpochRest(earlier, int(saved["batches"]), int(saved["start"]))


@dataclass(frozen=True)
class Rebased:
    """A checkpoint's data section in this layout's terms (``state``), the batch count Lightning's loop continues
    the epoch from (``loop_batches``; None: at an epoch's start), this layout's batches per epoch, and one line saying
    what happened (``notice``)."""

    state: dict[str, Any]
    loop_batches: int | None
    batches_per_epoch: int
    notice: str


def rebase_position(
    state: Mapping[str, Any],
    layout: Layout,
    accumulate: int,
    *,
    num_starts: Sequence[int],
    spec: ClipSpec,
    start_step: int,
    seed: int,
    batches_per_epoch: int,
) -> Rebased | None:
    """The data section ``state`` of a checkpoint saved on another layout, rewritten to continue its epoch on
    ``layout``: the starts the epoch's earlier parts took are left out and the epoch's batch count is where those
    clips bring this layout (:func:`~dora_lightning.data.epoch_rest.continue_epoch`). None when ``state`` is of this
    layout, or predates saving the gradient accumulation (its own checks then apply).

    Raises ValueError when the global batch (batch size x processes x accumulation) differs from the checkpoint's."""
    if "accumulate_grad_batches" not in state or any(key not in state for key in LAYOUT_KEYS):
        return None
    saved, saved_accumulate = layout_of(state), int(state["accumulate_grad_batches"])
    before, now = global_batch(saved, saved_accumulate), global_batch(layout, accumulate)
    if before != now:
        raise ValueError(_global_batch_refusal(saved, saved_accumulate, layout, accumulate))
    if saved == layout:
        return None
    epoch, batches = int(state["epoch"]), int(state["batches_done"])
    previous = load_rest(state.get("rest")) or EpochRest((), 0)
    segments = (*previous.earlier, Segment(saved, batches - previous.start))
    taken = consumed_starts(num_starts, spec, segments, start_step=start_step, seed=seed, epoch=epoch)
    clips = int(np.count_nonzero(taken))
    done, left = continue_epoch(
        clips, rest_batches_available(num_starts, taken, layout), batches_per_epoch, layout, accumulate
    )
    rebased = {**state, **{key: getattr(layout, key) for key in LAYOUT_KEYS}}
    rebased["accumulate_grad_batches"] = accumulate
    if clips == 0:  # at an epoch's start: the epoch as this layout deals it
        rebased |= {"rest": None}
        done = None
    elif left == 0:  # the earlier layouts took the whole epoch: the next one starts afresh
        rebased |= {"epoch": epoch + 1, "batches_done": 0, "rest": None}
    else:
        rebased |= {"batches_done": done, "rest": save_rest(EpochRest(segments, left, done))}
    # the cursors are named when they alone changed: else that change reads as none ("batch 2 -> batch 2")
    only_cursors = saved.describe() == layout.describe()
    change = (
        f"resuming on another layout ({saved.describe(only_cursors)} -> {layout.describe(only_cursors)}, "
        f"global batch {now})"
    )
    if done is None:
        notice = f"{change}: epoch {rebased['epoch']} starts on it"
    else:
        notice = (
            f"{change}: epoch {epoch} continues with the clips the checkpoint's run had not taken ({clips} of "
            f"{len(taken)} taken), from batch {done} of {batches_per_epoch}"
        )
    notice += "; the clips come in another order than on the checkpoint's layout (not bit-exact)"
    return Rebased(rebased, done, batches_per_epoch, notice)


def _global_batch_refusal(saved: Layout, saved_accumulate: int, layout: Layout, accumulate: int) -> str:
    """The one-line refusal of a resume with another global batch, with the settings that would keep it."""
    before, now = global_batch(saved, saved_accumulate), global_batch(layout, accumulate)
    fixes = []
    if before % (layout.batch_size * layout.world_size) == 0:
        fixes.append(f"--trainer.accumulate_grad_batches {before // (layout.batch_size * layout.world_size)}")
    if before % (layout.world_size * accumulate) == 0:
        fixes.append(f"--data.batch_size {before // (layout.world_size * accumulate)}")
    keep = " or ".join(fixes) if fixes else "a data.batch_size and accumulate_grad_batches that give it"
    return (
        f"--ckpt_path: the checkpoint's run trained with a global batch of {before} clips (data.batch_size "
        f"{saved.batch_size} x {saved.world_size} processes x accumulate_grad_batches {saved_accumulate}), this "
        f"run's is {now} ({layout.batch_size} x {layout.world_size} x {accumulate}); the lr and the schedules follow it: keep "
        f"{before} with {keep}, or start a new run from its weights with --init_from CKPT"
    )


class ClipStreamPosition:
    """The checkpointed position of :class:`~dora_lightning.data.datamodule.VideoClipDataModule` (a mixin: it reads
    the data module's settings, ``dataset`` and ``trainer``): ``state_dict``, ``load_state_dict``, ``rebase_state``
    and the position each iteration of the loader starts at."""

    _iterations: int = 0
    _resume: dict[str, Any] | None = None
    _saved_identity: dict[str, Any] | None = None
    # (epoch, its rest) while an epoch begun on other layouts runs
    _epoch_rest: tuple[int, EpochRest] | None = None

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _position(self) -> tuple[int, int, EpochRest | None]:
        """(epoch, batches already done in it, the rest of an epoch begun on other layouts) for the iteration that
        is starting; the batches are counted from where this layout's part of the epoch began.

        After ``load_state_dict``, iterations start at the checkpoint's position until one of them yields a batch,
        whatever the trainer's counters say: Lightning restores ``current_epoch`` only after it first iterates the
        loader, and may iterate it more than once at a restart."""
        if self._resume is not None:
            epoch, batches_done, rest = (
                self._resume["epoch"],
                self._resume["batches_done"],
                self._resume["rest"],
            )
            # a checkpoint of an older version, written at an epoch's end
            if rest is None and batches_done >= len(self.dataset) // self.batch_size:
                epoch, batches_done = epoch + 1, 0
            self._iterations = epoch + 1
            self._epoch_rest = None if rest is None else (epoch, rest)
            return epoch, batches_done - (0 if rest is None else rest.start), rest
        self._epoch_rest = None
        if self.trainer is not None:
            return self.trainer.current_epoch, 0, None
        epoch, self._iterations = self._iterations, self._iterations + 1
        return epoch, 0, None

    def _resume_started(self) -> None:
        """The iteration that started at the checkpoint's position has produced its first batch."""
        self._resume = None

    def _batches_per_epoch(self) -> int | None:
        """Batches in a training epoch: the trainer's count, else the stream's, cut as the trainer's
        ``limit_train_batches`` will cut it (Lightning counts only once the loader is built)."""
        if self.dataset is None:
            return None
        if self.trainer is not None and isinstance(self.trainer.num_training_batches, int):
            return self.trainer.num_training_batches
        batches = len(self.dataset) // self.batch_size
        limit = getattr(self.trainer, "limit_train_batches", None)
        if isinstance(limit, float):
            return int(batches * limit)
        return min(batches, limit) if isinstance(limit, int) else batches

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch to produce, (epoch, batches done in it), with what must match for an exact
        resume (:mod:`dora_lightning.data.position`); after an epoch's last batch it is (next epoch, 0), so a
        checkpoint written at an epoch's end or on its last batch resumes at the next epoch's start. The epoch is the
        last one started (``trainer.current_epoch`` is one ahead once an epoch's end hooks have run, e.g. after
        ``fit``, and would skip an epoch on resume)."""
        epoch, batches = self._iterations, 0
        if self.trainer is not None:
            loop = self.trainer.fit_loop
            epoch = max(loop.epoch_progress.current.started - 1, 0)
            batches = loop.epoch_loop.batch_progress.current.processed
            per_epoch = self._batches_per_epoch()
            if per_epoch is not None and batches >= per_epoch:
                epoch, batches = epoch + 1, 0
        rest = self._epoch_rest
        return {
            "epoch": epoch,
            "batches_done": batches,
            "seed": self.seed,
            "start_step": self.start_step,
            **{key: getattr(self._layout(), key) for key in LAYOUT_KEYS},
            "accumulate_grad_batches": self._accumulate(),
            "rest": save_rest(rest[1]) if rest is not None and rest[0] == epoch and batches else None,
            **self.identity(),
        }

    def identity(self) -> dict[str, Any]:
        """What makes a checkpoint's clips the same clips (:func:`~dora_lightning.data.position.data_identity`)."""
        return data_identity(
            self.videos, self.spec, self.frame_rate, self.decode_short_side, getattr(self, "transform", None)
        )

    def check_same_data(self, saved: Mapping[str, Any]) -> None:
        """Refuse a checkpoint of other data (:func:`~dora_lightning.data.identity.refuse_other_data`); say (process
        0) when only its videos' frame timelines changed (:func:`~dora_lightning.data.identity.timeline_note`)."""
        now = self.identity()
        refuse_other_data(saved, now)
        note = timeline_note(saved, now)
        if note is not None and self._rank_and_world()[0] == 0:
            sys.stderr.write(f"dora fit: {note}\n")

    def _layout(self) -> Layout:
        _, world = self._rank_and_world()
        return Layout(world, self.num_workers, self.batch_size, self.cursors)

    def _accumulate(self) -> int:
        return int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)

    def rebase_state(self, state: dict[str, Any]) -> Rebased | None:
        """A data section saved on another layout, in this layout's terms, with the batch count of the epoch that
        Lightning's loop must continue from (:func:`~dora_lightning.data.position.rebase_position`; said in one
        line); None when it needs no change. Called (by ``DoRAModule.on_load_checkpoint``) before
        :meth:`load_state_dict`, after :meth:`setup`."""
        if (
            self.dataset is None
            or state.get("seed") != self.seed
            or state.get("start_step") != self.start_step
        ):
            return None  # load_state_dict names what differs
        refuse_other_data(state, self.identity())
        rebased = rebase_position(
            state,
            self._layout(),
            self._accumulate(),
            num_starts=self.dataset.num_starts,
            spec=self.spec,
            start_step=self.start_step,
            seed=self.seed,
            batches_per_epoch=self._batches_per_epoch(),
        )
        if rebased is None:
            return None
        if self._rank_and_world()[0] == 0:
            sys.stderr.write(f"dora fit: {rebased.notice}\n")
        return rebased

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that the checkpoint's data is this run's (:meth:`identity`) and remember the saved position: the next
        iteration starts there (skipping the batches already done). A checkpoint of another layout comes here
        rebased (:meth:`rebase_state`)."""
        if self.videos:
            self.check_same_data(state_dict)
        else:  # not set up yet: checked once the videos are probed
            self._saved_identity = state_dict
        current = {"seed": self.seed, "start_step": self.start_step, **vars(self._layout())}
        saved = dict(state_dict)
        if saved.get("num_workers") is not None:  # earlier versions saved 0 as 0: 0 and 1 are one layout
            saved["num_workers"] = emitting_workers(int(saved["num_workers"]))
        # cursors and start_step are compared only when the checkpoint has them (older checkpoints do not)
        changed = {
            k: (saved.get(k), v)
            for k, v in current.items()
            if saved.get(k) != v and (k in saved or k not in ("cursors", "start_step"))
        }
        if changed:
            detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise ValueError(
                f"cannot resume the clip stream: {detail} differ from the checkpoint; resume with its data.seed and "
                "data.start_step (and, for a checkpoint of a version before 2026-12-05, its data.batch_size, "
                "data.num_workers, data.cursors and number of processes)"
            )
        self._resume = {
            "epoch": int(state_dict["epoch"]),
            "batches_done": int(state_dict["batches_done"]),
            "rest": load_rest(state_dict.get("rest")),
        }
        self._iterations = int(state_dict["epoch"])
