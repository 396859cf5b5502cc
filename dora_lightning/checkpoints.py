"""Load a pretrained ViT backbone from any checkpoint dora-lightning knows, and export it for plain timm.

Three kinds of file are recognised by their content, not their name:

* a Lightning checkpoint written by ``dora fit`` (``state_dict`` keys ``teacher.backbone.*`` / ``student.backbone.*``;
  the architecture comes from its ``hyper_parameters``);
* an exported backbone written by :func:`export_backbone` (``{"format": "dora-lightning/backbone", "model_name",
  "model_kwargs", "state_dict"}``), or the plain timm state dict it writes with ``plain=True``;
* an official DINO / DoRA checkpoint (``{"teacher": ..., "student": ...}`` with ``module.`` / ``backbone.`` prefixes and
  ``head.*`` keys), or a bare backbone state dict such as DINO's released ``dino_deitsmall16_pretrain.pth``; the
  architecture is inferred from the weights. ``.safetensors`` files holding such a state dict work as well.

Files are read with ``torch.load(..., weights_only=True)`` (``argparse.Namespace``, the ``args`` of official
checkpoints, is allowed), never unpickled in full: a pickle can run code, whatever format it claims
(:mod:`dora_lightning.checkpoint_formats` reads and recognises the files).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from dora_lightning.checkpoint_formats import (
    EXPORT_FORMAT,
    Kind,
    Spec,
    Which,
    infer_architecture,
    read_checkpoint_recorded,
    select_backbone,
)
from dora_lightning.errors import os_reason
from dora_lightning.models.backbone import build_vit, patch_size_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["EXPORT_FORMAT", "BackboneInfo", "export_backbone", "export_with_info", "load_backbone"]

_infer = infer_architecture  # its former name here, which tests import


@dataclass(frozen=True)
class BackboneInfo:
    """Where a backbone came from and how to rebuild it with timm.

    Attributes:
        path: the file it was loaded from.
        kind: ``lightning`` (``dora fit``), ``exported`` (:func:`export_backbone`), ``official`` (DINO / DoRA
            ``teacher``/``student`` checkpoint) or ``state_dict`` (a bare backbone state dict).
        which: ``teacher`` or ``student``; ``None`` for a bare state dict (DINO's released weights are the teacher's).
        model_name, model_kwargs: ``timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)``
            builds a model whose state dict the returned weights fit exactly (``model_kwargs`` holds ``img_size``).
        img_size: the input size the returned model is built for (its position-embedding grid x patch size).
        source_img_size: the size the weights were stored for; differs from ``img_size`` when ``pos_embed`` was
            interpolated.
        patch_size, embed_dim, depth, num_heads: the architecture.
        size_bytes, sha256: of the bytes the weights were read from (read once, from one open file).
    """

    path: Path
    kind: Kind
    which: Which | None
    model_name: str
    model_kwargs: dict[str, Any]
    img_size: int
    source_img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    size_bytes: int
    sha256: str

    def create_model_call(self) -> str:
        """The ``timm.create_model(...)`` call that builds this architecture, as Python source."""
        args = "".join(f", {k}={v!r}" for k, v in self.model_kwargs.items())
        return f'timm.create_model("{self.model_name}", pretrained=False, num_classes=0{args})'


# --------------------------------------------------------------------------------------------------- building
def _brief(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _fit_check(
    model: VisionTransformer, weights: Mapping[str, Tensor], path: Path, what: str, call: str
) -> None:
    """Raise a short ``ValueError`` unless ``weights`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    problems = [
        f"{label}: {_brief(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"'{path}': the {what} weights do not fit {call}: {'; '.join(problems)}; "
            "the file holds another architecture than the one recorded or inferred for it (e.g. register tokens or "
            "fc_norm); load it with the timm model it was written for"
        )


def _stored_grid(model: VisionTransformer, weights: Mapping[str, Tensor]) -> int | None:
    """The side of the square patch grid ``weights['pos_embed']`` was stored for (its tokens, less the model's class
    and register tokens); None without a position embedding or when its tokens make no square (then the fit check
    names the mismatch)."""
    stored = weights.get("pos_embed")
    if stored is None or stored.dim() != 3:
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    tokens = int(stored.shape[1]) - prefix
    grid = math.isqrt(max(tokens, 0))
    return grid if grid > 0 and grid * grid == tokens else None


def _resample_pos_embed(model: VisionTransformer, weights: dict[str, Tensor], source_grid: int) -> None:
    """Interpolate ``weights['pos_embed']`` in place to the model's patch grid (timm's bicubic resampling)."""
    target = model.pos_embed
    stored = weights.get("pos_embed")
    if target is None or stored is None or stored.shape == target.shape:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    weights["pos_embed"] = resample_abs_pos_embed(
        stored.float(),
        new_size=list(model.patch_embed.grid_size),
        old_size=[source_grid, source_grid],
        num_prefix_tokens=prefix,
    ).to(stored.dtype)


def _build(path: Path, spec: Spec, size: int) -> VisionTransformer:
    try:
        return build_vit(spec.model_name, img_size=size, drop_path_rate=0.0, **spec.model_kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"'{path}': cannot build {spec.model_name} with {spec.model_kwargs}: {err}") from err


def load_backbone(
    source: str | Path,
    which: Which = "teacher",
    img_size: int | None = None,
    *,
    num_heads: int | None = None,
) -> tuple[VisionTransformer, BackboneInfo]:
    """Load the teacher's (or student's) ViT backbone of a checkpoint into a timm model, in eval mode.

    The kind of checkpoint is read from its content (see the module docstring). The model is built with
    :func:`~dora_lightning.models.backbone.build_vit` (no classifier, dynamic image size, no drop path) and loaded
    strictly; when ``img_size`` differs from the size the weights were stored for, ``pos_embed`` is interpolated.
    ``which`` selects teacher or student where a file holds both; files with a single backbone (exported, bare state
    dicts) load whatever it says, except that ``which='student'`` on an exported teacher is refused. ``num_heads``
    is needed only for weights inferred from a DINO-style file whose embed dim is not 192/384/768/1024.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: not a torch file, a checkpoint without DoRA/DINO backbone weights, the requested ``which`` is
            absent, or the weights do not fit the architecture (missing/unexpected keys are listed).
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    path = Path(source)
    content, record = read_checkpoint_recorded(path)
    spec = select_backbone(path, content, which, num_heads)
    size = int(img_size) if img_size is not None else spec.img_size
    model = _build(path, spec, size)
    patch = patch_size_of(model)
    if img_size is not None and size % patch:
        raise ValueError(
            f"'{path}': img_size={size} is not a multiple of the patch size {patch}; pick a multiple"
        )
    weights = dict(spec.weights)
    # the size the weights were stored for, from their position embedding: a record may lack it or be wrong
    grid = _stored_grid(model, weights) or spec.img_size // patch
    stored_size = grid * patch
    if img_size is None and stored_size != size:
        size = stored_size
        model = _build(path, spec, size)
    _resample_pos_embed(model, weights, grid)
    info = BackboneInfo(
        path=path,
        kind=spec.kind,
        which=spec.which,
        model_name=spec.model_name,
        model_kwargs={"img_size": size, **spec.model_kwargs},
        img_size=size,
        source_img_size=stored_size,
        patch_size=patch,
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(model.blocks[0].attn.num_heads),
        size_bytes=record.size_bytes,
        sha256=record.sha256,
    )
    _fit_check(model, weights, path, spec.which or "backbone", info.create_model_call())
    model.load_state_dict(weights, strict=True)
    model.eval()
    return model, info


# --------------------------------------------------------------------------------------------------- export
def export_with_info(
    checkpoint: str | Path,
    output: str | Path,
    which: Which = "teacher",
    *,
    plain: bool = False,
    img_size: int | None = None,
    num_heads: int | None = None,
) -> tuple[Path, BackboneInfo]:
    """:func:`export_backbone`, also returning the :class:`BackboneInfo` of what was written."""
    source, out = Path(checkpoint), Path(output)
    model, info = load_backbone(source, which, img_size, num_heads=num_heads)
    if out.exists() and out.resolve() == source.resolve():
        raise ValueError(f"'{out}' is the checkpoint being exported; give a different output path")
    if out.is_dir():
        raise ValueError(f"'{out}' is a directory; give the output file name (e.g. {out / 'backbone.pth'})")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    payload: Any = (
        state
        if plain
        else {
            "format": EXPORT_FORMAT,
            "version": 1,
            "model_name": info.model_name,
            "model_kwargs": dict(info.model_kwargs),
            "which": info.which,
            "source": str(source),
            "state_dict": state,
        }
    )
    partial = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as stream:
            torch.save(payload, stream)
        os.replace(partial, out)
    except OSError as err:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise ValueError(f"cannot write '{out}' ({os_reason(err)}); give a writable output path") from err
    return out, info


class ExportOptions(TypedDict, total=False):
    """The keyword options of :func:`export_with_info`, which :func:`export_backbone` passes on."""

    plain: bool
    img_size: int | None
    num_heads: int | None


def export_backbone(
    checkpoint: str | Path, output: str | Path, which: Which = "teacher", **options: Unpack[ExportOptions]
) -> Path:
    """Write the ``which`` backbone of any checkpoint :func:`load_backbone` accepts as a timm-compatible file.

    By default the file is ``{"format": "dora-lightning/backbone", "model_name", "model_kwargs", "state_dict", ...}``
    and ``state_dict`` loads strictly into ``timm.create_model(model_name, pretrained=False, num_classes=0,
    **model_kwargs)``. With ``plain=True`` the file is just that timm state dict (``torch.save(model.state_dict())``);
    the model name and kwargs are then only printed by ``dora-export`` (or see ``load_backbone(output)[1]``).
    ``img_size`` re-sizes the position embedding; ``num_heads`` as in :func:`load_backbone`. Returns ``output``.
    """
    return export_with_info(checkpoint, output, which, **options)[0]
