"""StudentTeacher: a ViT backbone and its DINO head, the student's and the teacher's network."""

from __future__ import annotations

from torch import Tensor, nn

from dora_lightning.models.backbone import forward_features
from dora_lightning.models.head import DINOHead

__all__ = ["StudentTeacher"]


class StudentTeacher(nn.Module):
    """A ViT backbone and a DINO head; ``forward`` maps images to head logits (CLS token)."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: Tensor) -> Tensor:
        cls, _ = forward_features(self.backbone, images)
        return self.head(cls)
