"""DINO projection head (spec B: 384-2048-2048-256, GELU, no BN, L2-norm, weight-normalised 256 -> 65536)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "cancel_last_layer_grad_"]


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised linear layer without bias.

    ``mlp``: ``num_layers`` linear layers (``in_dim -> hidden_dim -> ... -> bottleneck_dim``) with GELU (and BatchNorm1d
    when ``use_bn``) between them, weights trunc-normal(std 0.02), biases 0; ``num_layers == 1`` is a single linear.
    The bottleneck output is L2-normalised, then ``last_layer`` (``bottleneck_dim -> out_dim``, no bias) is
    weight-normalised along the output dimension: ``W = g * v / ||v||`` row-wise, with ``g`` initialised to 1 and frozen
    (``requires_grad=False``) when ``norm_last_layer``. The official DoRA/ViT-S command uses ``norm_last_layer=False``.

    State-dict keys: the module layout matches the official head (``mlp.0.weight``, ``mlp.2.weight``, ...,
    ``mlp.weight`` for one layer), but the last layer uses the parametrisation API
    (``torch.nn.utils.parametrizations.weight_norm``), so its keys differ from the official (deprecated
    ``torch.nn.utils.weight_norm``) ones:

    * ``last_layer.parametrizations.weight.original0`` <-> official ``last_layer.weight_g``, shape (out_dim, 1);
    * ``last_layer.parametrizations.weight.original1`` <-> official ``last_layer.weight_v``, shape (out_dim, bottleneck_dim).

    The tensors are identical (same ``dim=0`` norm), only the names change; :attr:`weight_g` / :attr:`weight_v` return them.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        num_layers = max(num_layers, 1)
        if num_layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(num_layers - 2):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                layers.append(nn.Linear(hidden_dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), name="weight", dim=0)
        g = self.weight_g
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)
        self.norm_last_layer = norm_last_layer

    @property
    def weight_g(self) -> nn.Parameter:
        """The last layer's magnitude ``g`` (official key ``last_layer.weight_g``), shape (out_dim, 1)."""
        return self.last_layer.parametrizations.weight.original0

    @property
    def weight_v(self) -> nn.Parameter:
        """The last layer's direction ``v`` (official key ``last_layer.weight_v``), shape (out_dim, bottleneck_dim)."""
        return self.last_layer.parametrizations.weight.original1

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) features -> (..., out_dim) float32 logits.

        The MLP runs under any active autocast (e.g. bf16); the L2 normalisation and the wide last layer run in float32
        with autocast disabled (spec G.3), so the logits are never rounded to bf16 before the softmax and the loss.
        """
        x = self.mlp(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.last_layer(F.normalize(x.float(), dim=-1, p=2))


def cancel_last_layer_grad_(head: nn.Module) -> None:
    """Drop the gradients of ``head.last_layer`` (DINO freezes the last layer during the first epoch).

    Sets them to ``None``, like the official ``cancel_gradients_last_layer``, so optimisers skip those parameters
    entirely (no weight decay, no moment update); ``head`` may be a :class:`DINOHead` or any module with a
    ``last_layer`` attribute.
    """
    last = getattr(head, "last_layer", None)
    if last is None:
        raise ValueError(f"{type(head).__name__} has no 'last_layer' to cancel gradients of")
    for p in last.parameters():
        p.grad = None
