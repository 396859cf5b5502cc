"""The training diagnostics DoRAModule writes every N steps straight to its loggers (not through ``self.log``).

Schedule values and the tracker's mask areas are not needed by any callback, and logging them with ``self.log`` at
every step costs a host-to-device copy per Python number (which waits for the GPU) and keeps stale values in
Lightning's results; writing them to the loggers every ``N`` steps costs one device read per ``N`` steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lightning.pytorch.loggers import Logger
from torch import Tensor

__all__ = ["diagnostics_due", "write_diagnostics"]


def diagnostics_due(step: int, every: int) -> bool:
    """Whether optimiser step ``step`` writes diagnostics when they are written every ``every`` steps (0: never)."""
    return every > 0 and step % every == 0


def write_diagnostics(
    loggers: Iterable[Logger], step: int, schedule: Mapping[str, float], masks: Tensor | None
) -> None:
    """Write ``train/<name>`` for each schedule value and, given the tracker's masks (B, k, T, H, W),
    ``tracker/mask_area_obj{i}`` (fraction of pixels object i's masks keep) to every logger at ``step``."""
    metrics = {f"train/{name}": float(value) for name, value in schedule.items()}
    if masks is not None:
        areas = masks.float().mean(dim=(0, 2, 3, 4)).tolist()  # the one device read of these steps
        metrics.update({f"tracker/mask_area_obj{i}": area for i, area in enumerate(areas)})
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
