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
checkpoints, is allowed); only a file that names one of dora-lightning's own formats is unpickled in full when it needs it.
"""

from __future__ import annotations

import argparse
import math
import os
import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from dora_lightning.models.backbone import build_vit

__all__ = ["EXPORT_FORMAT", "BackboneInfo", "export_backbone", "load_backbone"]

EXPORT_FORMAT = "dora-lightning/backbone"
PRETRAIN_KIND = "dora-lightning/pretrain"
_OWN_MARKERS = (EXPORT_FORMAT, PRETRAIN_KIND)
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_USAGE = "give a checkpoint from `dora fit`, an exported backbone, or an official DINO/DoRA checkpoint"
# embed dim -> (timm family, depth, heads) of the standard ViTs (DINO / DoRA use 64-dim heads throughout)
_FAMILIES = {
    192: ("vit_tiny", 12, 3),
    384: ("vit_small", 12, 6),
    768: ("vit_base", 12, 12),
    1024: ("vit_large", 24, 16),
}

Which = Literal["teacher", "student"]
Kind = Literal["lightning", "exported", "official", "state_dict"]


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

    def create_model_call(self) -> str:
        """The ``timm.create_model(...)`` call that builds this architecture, as Python source."""
        args = "".join(f", {k}={v!r}" for k, v in self.model_kwargs.items())
        return f'timm.create_model("{self.model_name}", pretrained=False, num_classes=0{args})'


@dataclass
class _Spec:
    """Weights with timm key names and the architecture to build for them."""

    kind: Kind
    which: Which | None
    weights: dict[str, Tensor]
    model_name: str
    model_kwargs: dict[str, Any]  # without img_size
    img_size: int


# --------------------------------------------------------------------------------------------------- reading files
def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= size <= path.stat().st_size - 8


def _zip_pickle(path: Path) -> bytes | None:
    """The ``data.pkl`` of a torch zip file, or ``None`` when ``path`` is not one."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            return archive.read(names[0]) if names else None
    except (zipfile.BadZipFile, OSError):
        return None


def _is_legacy_torch(path: Path) -> bool:
    """True for the pre-1.6 torch format, whose first pickle is torch's magic number (read without unpickling)."""
    with path.open("rb") as fh:
        head = fh.read(64)
    if not head.startswith(b"\x80"):
        return False
    try:
        for opcode, arg, _ in pickletools.genops(head):
            if opcode.name in ("LONG1", "LONG4", "LONG", "INT"):
                return arg == _TORCH_LEGACY_MAGIC
    except (ValueError, TypeError):
        return False
    return False


def _names_own_format(pickled: bytes) -> bool:
    """Whether a pickle (scanned, not executed) holds one of dora-lightning's format markers."""
    try:
        return any(isinstance(arg, str) and arg in _OWN_MARKERS for _, arg, _ in pickletools.genops(pickled))
    except (ValueError, TypeError):
        return False


def _read(path: Path) -> Any:
    """Load ``path`` on the CPU, safely unless it is one of our own files that needs a full unpickle."""
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist; {_USAGE}")
    if path.is_dir():
        raise ValueError(
            f"'{path}' is a directory; give the checkpoint file itself (e.g. .../checkpoints/last.ckpt)"
        )
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    pickled = _zip_pickle(path)
    if pickled is None and not _is_legacy_torch(path):
        raise ValueError(f"'{path}' is not a PyTorch checkpoint (torch.save / .safetensors file); {_USAGE}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable content
        message = str(err)
        if "Weights only load failed" not in message:
            raise ValueError(
                f"'{path}' could not be read by torch.load ({type(err).__name__}: {message.splitlines()[0][:200]}); "
                "the file is damaged or incomplete: copy or write it again"
            ) from err
        if pickled is not None and _names_own_format(pickled):
            return torch.load(path, map_location="cpu", weights_only=False)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        what = f"the Python object {found.group(1)}" if found else "Python objects other than tensors"
        raise ValueError(
            f"'{path}' holds {what}, which torch.load(weights_only=True) refuses, and is not a dora-lightning file; "
            "if you trust it, re-save just its weights: torch.save(torch.load(path, weights_only=False)[...], 'weights.pth')"
        ) from err


# --------------------------------------------------------------------------------------------------- recognising content
def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _strip(key: str) -> str:
    """Drop leading ``module.`` / ``backbone.`` (DDP and MultiCropWrapper prefixes), in any order."""
    while key.startswith(("module.", "backbone.")):
        key = key.split(".", 1)[1]
    return key


def _backbone_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """timm-named backbone weights of a DINO-style state dict (head dropped), or ``None`` when it holds no ViT."""
    weights = {_strip(k): v for k, v in state.items()}
    weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
    if not {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= weights.keys():
        return None
    return weights


def _summary(obj: Any) -> str:
    """A short list of a checkpoint's keys for error messages."""
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}, not a dict"
    parts = []
    for key in list(obj)[:10]:
        value = obj[key]
        if isinstance(value, Mapping) and value and key != "hyper_parameters":
            inner = list(value)[:3]
            more = ", ..." if len(value) > 3 else ""
            parts.append(f"{key} ({', '.join(map(str, inner))}{more})")
        else:
            parts.append(str(key))
    if len(obj) > 10:
        parts.append(f"+{len(obj) - 10} more")
    return ", ".join(parts) or "none"


def _no_backbone(path: Path, obj: Any) -> ValueError:
    return ValueError(f"'{path}' holds no DoRA/DINO backbone weights (found keys: {_summary(obj)}); {_USAGE}")


def _only_other(path: Path, which: str, other: str, hint: str) -> ValueError:
    return ValueError(f"'{path}' holds no {which} backbone, only the {other}'s; use which='{other}'{hint}")


def _infer(
    weights: Mapping[str, Tensor], path: Path, num_heads: int | None
) -> tuple[str, dict[str, Any], int]:
    """timm name, overrides (without img_size) and image size of DINO-layout ViT weights."""
    embed_dim = int(weights["cls_token"].shape[-1])
    patch_size = int(weights["patch_embed.proj.weight"].shape[-1])
    blocks = {int(m.group(1)) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    if depth == 0:
        raise ValueError(f"'{path}' has ViT embeddings but no 'blocks.N.*' weights; {_USAGE}")
    tokens = int(weights["pos_embed"].shape[1]) - 1  # minus the class token
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens:
        raise ValueError(
            f"'{path}': pos_embed has {tokens + 1} tokens, not 1 class token + a square patch grid "
            "(register tokens or a rectangular grid); only plain DINO-style ViTs are inferred from weights"
        )
    family = min(_FAMILIES, key=lambda dim: abs(dim - embed_dim))
    prefix, family_depth, family_heads = _FAMILIES[family]
    if num_heads is None:
        if embed_dim not in _FAMILIES:
            raise ValueError(
                f"'{path}': cannot tell the number of attention heads of a ViT with embed dim {embed_dim} from "
                "its weights; pass num_heads= (dora-export --num-heads)"
            )
        num_heads = _FAMILIES[embed_dim][2]
    if embed_dim % num_heads:
        raise ValueError(f"'{path}': embed dim {embed_dim} is not divisible by num_heads={num_heads}")
    img_size = grid * patch_size
    for name in (f"{prefix}_patch{patch_size}_{img_size}", f"{prefix}_patch{patch_size}_224"):
        if timm.is_model(name):
            break
    else:
        name = f"{prefix}_patch16_224"
    kwargs: dict[str, Any] = {}
    if f"_patch{patch_size}_" not in name:
        kwargs["patch_size"] = patch_size
    if embed_dim != family:
        kwargs["embed_dim"] = embed_dim
    if depth != family_depth:
        kwargs["depth"] = depth
    if num_heads != family_heads:
        kwargs["num_heads"] = num_heads
    hidden = weights.get("blocks.0.mlp.fc1.weight")
    if hidden is not None and hidden.shape[0] != 4 * embed_dim:
        kwargs["mlp_ratio"] = hidden.shape[0] / embed_dim
    if "blocks.0.attn.qkv.bias" not in weights:
        kwargs["qkv_bias"] = False
    return name, kwargs, img_size


def _from_lightning(path: Path, obj: Mapping[str, Any], which: Which, num_heads: int | None) -> _Spec:
    state = obj["state_dict"]
    found = {w for w in ("teacher", "student") if any(k.startswith(f"{w}.backbone.") for k in state)}
    if not found:
        raise _no_backbone(path, obj)
    if which not in found:
        raise _only_other(path, which, found.pop(), "")
    prefix = f"{which}.backbone."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    hp = obj.get("hyper_parameters")
    if not isinstance(hp, Mapping) or not isinstance(hp.get("backbone"), str):
        if _backbone_weights(weights) is None:
            raise _no_backbone(path, obj)
        name, kwargs, size = _infer(weights, path, num_heads)
        return _Spec("lightning", which, weights, name, kwargs, size)
    overrides = {k: hp[k] for k in ("patch_size", "depth", "embed_dim", "num_heads") if hp.get(k) is not None}
    return _Spec("lightning", which, weights, hp["backbone"], overrides, int(hp.get("img_size", 224)))


def _from_export(path: Path, obj: Mapping[str, Any], which: Which) -> _Spec:
    name, kwargs, state = obj.get("model_name"), obj.get("model_kwargs"), obj.get("state_dict")
    if not isinstance(name, str) or not isinstance(kwargs, Mapping) or not _is_tensor_dict(state):
        raise ValueError(
            f"'{path}' says it is a {EXPORT_FORMAT} file but lacks a model_name, model_kwargs or state_dict; "
            "export it again with dora-export"
        )
    stored = obj.get("which")
    if which == "student" and stored == "teacher":
        raise _only_other(
            path, "student", "teacher", " or export the student: dora-export CKPT OUT --which student"
        )
    kwargs = dict(kwargs)
    size = int(kwargs.pop("img_size", 224))
    return _Spec(
        "exported", stored if stored in ("teacher", "student") else None, dict(state), name, kwargs, size
    )


def _from_official(path: Path, obj: Mapping[str, Any], which: Which, num_heads: int | None) -> _Spec:
    sections = {w: obj[w] for w in ("teacher", "student") if _is_tensor_dict(obj.get(w))}
    found = {w: weights for w, s in sections.items() if (weights := _backbone_weights(s)) is not None}
    if not found:
        raise _no_backbone(path, obj)
    if which not in found:
        raise _only_other(path, which, next(iter(found)), " (dora-export: --which teacher)")
    weights = found[which]
    name, kwargs, size = _infer(weights, path, num_heads)
    return _Spec("official", which, weights, name, kwargs, size)


def _select(path: Path, obj: Any, which: Which, num_heads: int | None) -> _Spec:
    """Recognise the checkpoint's kind and pick the requested backbone's weights."""
    if not isinstance(obj, Mapping):
        raise _no_backbone(path, obj)
    if obj.get("format") == EXPORT_FORMAT:
        return _from_export(path, obj, which)
    if isinstance(obj.get("state_dict"), Mapping):
        return _from_lightning(path, obj, which, num_heads)
    if "teacher" in obj or "student" in obj:
        return _from_official(path, obj, which, num_heads)
    if _is_tensor_dict(obj) and (weights := _backbone_weights(obj)) is not None:
        name, kwargs, size = _infer(weights, path, num_heads)
        return _Spec("state_dict", None, weights, name, kwargs, size)
    raise _no_backbone(path, obj)


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
    spec = _select(path, _read(path), which, num_heads)
    size = int(img_size) if img_size is not None else spec.img_size
    try:
        model = build_vit(spec.model_name, img_size=size, drop_path_rate=0.0, **spec.model_kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"'{path}': cannot build {spec.model_name} with {spec.model_kwargs}: {err}") from err
    patch = int(model.patch_embed.patch_size[0])
    if img_size is not None and size % patch:
        raise ValueError(
            f"'{path}': img_size={size} is not a multiple of the patch size {patch}; pick a multiple"
        )
    weights = dict(spec.weights)
    _resample_pos_embed(model, weights, spec.img_size // patch)
    info = BackboneInfo(
        path=path,
        kind=spec.kind,
        which=spec.which,
        model_name=spec.model_name,
        model_kwargs={"img_size": size, **spec.model_kwargs},
        img_size=size,
        source_img_size=spec.img_size,
        patch_size=patch,
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(model.blocks[0].attn.num_heads),
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
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, out)
    return out, info


def export_backbone(
    checkpoint: str | Path,
    output: str | Path,
    which: Which = "teacher",
    *,
    plain: bool = False,
    img_size: int | None = None,
    num_heads: int | None = None,
) -> Path:
    """Write the ``which`` backbone of any checkpoint :func:`load_backbone` accepts as a timm-compatible file.

    By default the file is ``{"format": "dora-lightning/backbone", "model_name", "model_kwargs", "state_dict", ...}``
    and ``state_dict`` loads strictly into ``timm.create_model(model_name, pretrained=False, num_classes=0,
    **model_kwargs)``. With ``plain=True`` the file is just that timm state dict (``torch.save(model.state_dict())``);
    the model name and kwargs are then only printed by ``dora-export`` (or see ``load_backbone(output)[1]``).
    ``img_size`` re-sizes the position embedding; ``num_heads`` as in :func:`load_backbone`. Returns ``output``.
    """
    return export_with_info(checkpoint, output, which, plain=plain, img_size=img_size, num_heads=num_heads)[0]
