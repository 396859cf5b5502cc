"""The crop resampling shared by the CPU and the device renderers."""

from __future__ import annotations

from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["roi_align_views"]


def roi_align_views(image: Tensor, rois: Tensor, size: int) -> Tensor:
    """``size x size`` views of ``image`` (N, C, H, W) float, one per row (index, x0, y0, x1, y1) of ``rois`` (K, 5),
    pixel-edge coordinates (any float dtype, any device: converted to ``image``'s), by bilinear ``roi_align`` with
    adaptive sampling (``ceil(box size / output size)`` samples per bin and direction, i.e. box-averaged when
    shrinking) and aligned pixel centres. Returns (K, C, size, size)."""
    rois = rois.to(dtype=image.dtype).to(image.device, non_blocking=True)
    return roi_align(
        image, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True
    )
