"""What a video's packet timestamps say beyond its header: the rate its frames come at (the nominal rate when the
header has none, or only an average that pauses make meaningless), timestamps that restart mid-file, and the notes
to give the user about a file whose timestamps jump or repeat (:func:`timeline_notes`)."""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dora_lightning.data.timeline import Timeline

MISSING = np.iinfo(np.int64).min  # a packet without this timestamp
RATE_AGREEMENT = 0.02  # a header's rate within 2% of the timestamps' typical rate is taken as stated
SNAP = 0.01  # a typical rate within 1% of a usual frame rate is that rate
USUAL_RATES = tuple(
    Fraction(r)
    for r in (
        *(Fraction(n * 1000, 1001) for n in (24, 30, 60, 120)),
        5,
        8,
        10,
        12,
        12.5,
        15,
        20,
        24,
        25,
        30,
        48,
        50,
        60,
        72,
        90,
        96,
        100,
        120,
        144,
        180,
        240,
    )
)
RESTART_SECONDS = (
    0.5  # a timestamp this far below the previous packet's, in demux order, restarts the timeline
)
PAUSE_SECONDS = 10.0  # a jump between consecutive frames at least this long is a pause in the recording
PAUSE_SHARE = 0.01  # ... said when the frames it repeats are at least this share of the file's


def typical_rate(presentation: np.ndarray, time_base: Fraction) -> float | None:
    """The rate frames come at in sorted distinct timestamps ``presentation``: the mean of the intervals near the
    median one (half to one and a half of it), so pauses, dropped frames and bursts do not count; None for fewer
    than three frames."""
    if len(presentation) < 3:
        return None
    steps = np.diff(presentation).astype(np.float64)
    median = float(np.median(steps))
    usual = steps[(steps >= 0.5 * median) & (steps <= 1.5 * median)]
    seconds = float(usual.sum()) * float(time_base)
    return len(usual) / seconds if seconds > 0 else None


def _snapped(rate: float) -> Fraction:
    """``rate`` as the usual frame rate within 1% of it (the nearest), else rounded to 1/100 fps."""
    near = min(USUAL_RATES, key=lambda usual: abs(float(usual) / rate - 1))
    if abs(float(near) / rate - 1) <= SNAP:
        return near
    return Fraction(round(rate * 100), 100)


def nominal_rate(
    average: Fraction | None,
    stated: Iterable[Fraction | None],
    presentation: np.ndarray,
    time_base: Fraction,
) -> Fraction | None:
    """The rate frame indices count in, from the header's ``average`` rate, the other rates it states (``stated``:
    FFmpeg's guessed rate, the codec's, the stream's base rate, in that order of trust) and the sorted distinct
    timestamps of the coded frames ``presentation``:

    * the average rate, as documented (a variable-rate phone video counts at its average), unless the frames come
      at more than twice it: then pauses take most of the file's time and the average is no frame rate;
    * else (no average: a WebM written live without a frame duration, MPEG-1 in MPEG-TS) the first stated rate
      within 2% of the timestamps' :func:`typical_rate`, else that rate itself (a usual rate within 1%, e.g. 30 for
      30.1); the first stated rate when the timestamps cannot tell (fewer than three).
    """
    stated = [Fraction(rate) for rate in stated if rate]
    typical = typical_rate(presentation, time_base)
    if average and (typical is None or 2 * float(average) >= typical):
        return Fraction(average)
    if typical is None:
        return stated[0] if stated else None
    for rate in stated:
        if abs(float(rate) / typical - 1) <= RATE_AGREEMENT:
            return rate
    return _snapped(typical)


def count_restarts(pts: np.ndarray, dts: np.ndarray, time_base: Fraction) -> int:
    """How many times the timestamps (decode timestamps where packets have them) fall back by more than half a
    second from one packet to the next, in demux order: segments joined end to end, a clock that restarted; the
    reordering of B-frames moves presentation timestamps back by a few frames only."""
    stamps = np.where(dts == MISSING, pts, dts)
    stamps = stamps[stamps != MISSING]
    margin = RESTART_SECONDS / float(time_base)
    return int(np.count_nonzero(stamps[1:] < stamps[:-1] - margin))


def _clock(seconds: float) -> str:
    """``seconds`` as m:ss.s (h:mm:ss.s past an hour)."""
    minutes, rest = divmod(round(seconds, 1), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" if hours else f"{minutes}:{rest:04.1f}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _repeat_note(path: str, timeline: Timeline) -> str | None:
    repeated, coded = timeline.repeated_timestamps, timeline.coded_frames
    if repeated <= max(2, coded // 100):
        return None
    if timeline.restarts:
        times = "once" if timeline.restarts == 1 else f"{timeline.restarts} times"
        return (
            f"'{path}': its timestamps restart {times} mid-file (files joined end to end?): {repeated} of its "
            f"{coded} frames repeat timestamps of earlier frames, and only one frame of each timestamp can train; "
            "give the parts as separate files"
        )
    return (
        f"'{path}': {repeated} duplicate timestamps ({repeated} of its {coded} frames repeat timestamps of earlier "
        "frames); a player shows one frame per timestamp, so those frames do not train"
    )


def _pause_note(path: str, timeline: Timeline) -> str | None:
    source = timeline.source_pts
    if timeline.order_mode or source is None or len(source) < 2:
        return None
    seconds = np.diff(source).astype(np.float64) * float(timeline.time_base)
    pauses = np.flatnonzero(seconds >= PAUSE_SECONDS)
    fps = float(timeline.fps)
    repeats = int(sum(max(0, round(seconds[j] * fps) - 1) for j in pauses))
    if len(pauses) == 0 or repeats < PAUSE_SHARE * timeline.num_frames:
        return None
    j = int(pauses[np.argmax(seconds[pauses])])
    before = float((source[j] - timeline.start_pts) * timeline.time_base)
    after = float((source[j + 1] - timeline.start_pts) * timeline.time_base)
    which = f"the longest of {len(pauses)} pauses: " if len(pauses) > 1 else ""
    note = (
        f"'{path}': its timestamps jump by {_duration(seconds[j])} after {_clock(before)} ({which}a paused "
        f"recording?); a player shows the picture before a pause all along it, so about {repeats:,} of its "
        f"{timeline.num_frames:,} frames repeat one picture; "
    )
    if len(pauses) == 1:
        end = before + 1 / fps
        stem, suffix = Path(path).with_suffix(""), Path(path).suffix
        note += (
            f"to train without them, cut the pause out: ffmpeg -i '{path}' -t {end:.3f} -c copy '{stem}_1{suffix}' "
            f"and ffmpeg -ss {after:.3f} -i '{path}' -c copy '{stem}_2{suffix}'"
        )
    else:
        note += "to train without them, cut the pauses out (ffmpeg -ss / -t with -c copy)"
    typical = typical_rate(source, timeline.time_base)
    first: np.ndarray = timeline._first_index  # type: ignore[attr-defined]
    passed_over = int(np.count_nonzero(first[1:] == first[:-1]))  # coded frames no frame index shows
    if timeline.source_fps is None and typical is not None and fps * 1.1 < typical and passed_over:
        rate = f"{float(_snapped(typical)):g}"
        note += (
            f"; it is read at its average rate, {fps:.3g} fps, while its frames come at {rate} fps, so "
            f"{passed_over:,} of its {len(source):,} pictures never show: --data.frame_rate {rate} trains on all"
        )
    return note


def timeline_notes(path: str, timeline: Timeline) -> list[str]:
    """What to tell the user about a file whose timestamps repeat (a few duplicates, or timestamps that restart:
    files joined end to end) or jump (a recording paused for at least 10 s, if its repeated picture is at least 1%
    of the frames): one line each, naming the file, what was seen and what to do."""
    return [note for note in (_repeat_note(path, timeline), _pause_note(path, timeline)) if note]
