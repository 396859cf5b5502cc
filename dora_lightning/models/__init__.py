"""Backbones (timm ViTs with tracker taps) and the DINO projection head."""

from dora_lightning.models.backbone import (
    TeacherForward,
    build_vit,
    check_vit,
    forward_features,
    forward_with_last_block_taps,
    last_n_block_cls,
)
from dora_lightning.models.head import DINOHead, cancel_last_layer_grad_

__all__ = [
    "DINOHead",
    "TeacherForward",
    "build_vit",
    "cancel_last_layer_grad_",
    "check_vit",
    "forward_features",
    "forward_with_last_block_taps",
    "last_n_block_cls",
]
