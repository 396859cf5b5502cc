"""What went wrong while decoding, counted and said once: per-worker counters merged at the epoch's end, and the
first sighting of each problem in a file warned once for all the workers of a loader."""

from __future__ import annotations

import itertools
import multiprocessing
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DecodeStats", "WarnedOnce"]


class WarnedOnce:
    """Which (file, problem) pairs have had their warning line, shared by a loader's worker processes (shared memory
    made before they start) for as long as the loader lives: a damaged file is named when it is first met, not once
    per worker and epoch; the end-of-epoch counters still come every epoch. A path not given here is never shared
    (each worker warns it once per epoch)."""

    KINDS = ("decode", "missing", "size", "seek")

    def __init__(self, paths: Sequence[str], context: Any | None = None) -> None:
        pairs = itertools.product(dict.fromkeys(paths), self.KINDS)
        self._slots = {pair: slot for slot, pair in enumerate(pairs)}
        self._flags = (context or multiprocessing.get_context()).Array("B", max(1, len(self._slots)))

    def first(self, path: str, kind: str) -> bool:
        """True the first time ``(path, kind)`` is asked for in any process, False after that."""
        slot = self._slots.get((path, kind))
        if slot is None:
            return True
        with self._flags.get_lock():
            if self._flags[slot]:
                return False
            self._flags[slot] = 1
            return True


@dataclass
class DecodeStats:
    """Counters of one worker's decoding; they travel with the emitted samples so the main process can sum them."""

    epoch: int = 0  # the epoch the counters are of (its lines name it)
    decoded_frames: int = 0
    decode_errors: int = 0
    missing_frames: int = 0
    substituted_clips: int = 0
    # per file, the indices of the damaged frames met (a frame counts once however many reads meet it)
    damaged_frames: dict[str, set[int]] = field(default_factory=dict)
    first_damage: dict[str, str] = field(default_factory=dict)
    warned: set[tuple[str, str]] = field(default_factory=set)
    # files FFmpeg refused to seek in (EPERM): read from their start by this worker's next readers of the epoch (such
    # a seek never succeeds, so it is not tried again)
    unseekable: set[str] = field(default_factory=set)
    shared: WarnedOnce | None = field(default=None, repr=False, compare=False)

    def warn_once(self, path: str, kind: str, message: str) -> None:
        """Warn about ``path`` once per kind of problem: once per run for all the workers of a loader when
        ``shared`` is given, else once per epoch in this worker (the counters keep the totals either way)."""
        if (path, kind) not in self.warned:
            self.warned.add((path, kind))
            if self.shared is None or self.shared.first(path, kind):
                warnings.warn(message, RuntimeWarning, stacklevel=3)

    def note_damage(self, path: str, logs: list[str]) -> None:
        """Remember the first decoder message about damage in ``path`` (for the end-of-epoch line)."""
        if path not in self.first_damage:
            messages = [message.strip() for message in logs if message.strip()]
            self.first_damage[path] = messages[0] if messages else "corrupt frame"

    def count_damaged(self, path: str, index: int) -> None:
        """Note frame ``index`` of ``path`` as damaged (each frame counts once, however many reads meet it)."""
        self.damaged_frames.setdefault(path, set()).add(index)

    def damage_lines(self) -> list[str]:
        """One line per file with damaged frames: how many were skipped and FFmpeg's first message."""
        return [
            f"'{path}': {len(indices)} damaged frames could not be decoded cleanly and were skipped in epoch "
            f"{self.epoch} (FFmpeg: "
            f'"{self.first_damage.get(path, "corrupt frame")}"); clips that need them were replaced by the previous '
            "good clip"
            for path, indices in sorted(self.damaged_frames.items())
        ]

    def report(self) -> dict[str, Any]:
        """This worker's end-of-epoch counters as plain data, for the training process to merge (:meth:`merged`)."""
        return {
            "epoch": self.epoch,
            "decode_errors": self.decode_errors,
            "missing_frames": self.missing_frames,
            "substituted_clips": self.substituted_clips,
            "damaged_frames": {path: sorted(indices) for path, indices in self.damaged_frames.items()},
            "first_damage": dict(self.first_damage),
            "paths": sorted({path for path, _ in self.warned}),
        }

    @classmethod
    def merged(cls, reports: Iterable[dict[str, Any]]) -> DecodeStats:
        """The counters of all workers of an epoch summed (the damaged frames of a file: those any worker met), so
        that the epoch's lines come once per file, not once per worker."""
        total = cls()
        for report in reports:
            total.epoch = report["epoch"]
            total.decode_errors += report["decode_errors"]
            total.missing_frames += report["missing_frames"]
            total.substituted_clips += report["substituted_clips"]
            for path, indices in report["damaged_frames"].items():
                total.damaged_frames.setdefault(path, set()).update(indices)
            for path, message in report["first_damage"].items():
                total.first_damage.setdefault(path, message)
            total.warned |= {(path, "report") for path in report["paths"]}
        return total

    def epoch_lines(self) -> list[str]:
        """The end-of-epoch warning lines: one per file with damaged frames, then the totals (if any problem)."""
        summary = self.summary()
        return self.damage_lines() + ([summary] if summary is not None else [])

    def summary(self) -> str | None:
        """One line with the totals of the problems met, or None when there were none."""
        damaged = sum(len(indices) for indices in self.damaged_frames.values())
        if not (self.decode_errors or self.missing_frames or self.substituted_clips or damaged):
            return None
        paths = {path for path, _ in self.warned} | set(self.damaged_frames)
        files = ", ".join(sorted(f"'{path}'" for path in paths))
        return (
            f"clip stream: {self.decode_errors} decode errors, {damaged} damaged frames, {self.missing_frames} missing "
            f"frames, {self.substituted_clips} clips replaced by the previous good clip in epoch {self.epoch} ({files})"
        )
