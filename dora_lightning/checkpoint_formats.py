"""Reading checkpoint files and recognising their layout, for :mod:`dora_lightning.checkpoints`.

:func:`read_checkpoint` loads a file with ``torch.load(..., weights_only=True)`` (``argparse.Namespace``, the ``args``
of official checkpoints, is allowed) or safetensors; no file is ever unpickled in full (a pickle can run code).
:func:`select_backbone` recognises the kind of checkpoint from its content, picks
the teacher's or student's weights with timm key names, and reads or infers (:func:`infer_architecture`) the ViT to
build for them. The layouts are described in :mod:`dora_lightning.checkpoints`.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import timm
import torch
from torch import Tensor

__all__ = [
    "EXPORT_FORMAT",
    "PRETRAIN_KIND",
    "FileRecord",
    "Kind",
    "Spec",
    "Which",
    "file_sha256",
    "infer_architecture",
    "read_checkpoint",
    "read_checkpoint_recorded",
    "select_backbone",
]

EXPORT_FORMAT = "dora-lightning/backbone"
PRETRAIN_KIND = "dora-lightning/pretrain"
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


@dataclass
class Spec:
    """Weights with timm key names and the architecture to build for them."""

    kind: Kind
    which: Which | None
    weights: dict[str, Tensor]
    model_name: str
    model_kwargs: dict[str, Any]  # without img_size
    img_size: int


# --------------------------------------------------------------------------------------------------- reading files
@dataclass(frozen=True)
class FileRecord:
    """Size and sha256 of the bytes a checkpoint was read from, taken from the same open file as the weights: a file
    replaced meanwhile (``dora fit`` replaces ``last.ckpt``) is never recorded in place of the one that was read."""

    size_bytes: int
    sha256: str


def _is_safetensors(fh: BinaryIO, size: int) -> bool:
    head = _head(fh, 9)
    if len(head) < 9:
        return False
    header = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= header <= size - 8


def _head(fh: BinaryIO, count: int) -> bytes:
    fh.seek(0)
    return fh.read(count)


def _zip_names(fh: BinaryIO) -> list[str] | None:
    """The member names of a complete zip file (a torch checkpoint since torch 1.6), or ``None`` when it is not one."""
    fh.seek(0)
    if not zipfile.is_zipfile(fh):
        return None
    try:
        with zipfile.ZipFile(fh) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def _is_legacy_torch(fh: BinaryIO) -> bool:
    """True for the pre-1.6 torch format, whose first pickle is torch's magic number (read without unpickling)."""
    head = _head(fh, 64)
    if not head.startswith(b"\x80"):
        return False
    try:
        for opcode, arg, _ in pickletools.genops(head):
            if opcode.name in ("LONG1", "LONG4", "LONG", "INT"):
                return arg == _TORCH_LEGACY_MAGIC
    except (ValueError, TypeError):
        return False
    return False


def _damaged(path: Path, reader: str, why: Exception | str) -> str:
    """The one line for a checkpoint file whose reader (``torch.load``, ``safetensors``) failed on its content."""
    if isinstance(why, Exception):
        lines = str(why).splitlines() or [""]
        why = f"{type(why).__name__}: {lines[0][:200]}"
    return f"'{path}' could not be read by {reader} ({why}); the file is damaged or incomplete: copy or write it again"


def _sha256(fh: BinaryIO, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    fh.seek(0)
    while chunk := fh.read(block):
        digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: Path) -> Any:
    """Load ``path`` on the CPU, always safely: ``torch.load(weights_only=True)`` (or safetensors). No file is ever
    unpickled in full, whatever it claims to be: a pickle can run code, and our own fit checkpoints and exported
    backbones hold only tensors, numbers, strings and containers."""
    return _read(path, record=False)[0]


def read_checkpoint_recorded(path: Path) -> tuple[Any, FileRecord]:
    """:func:`read_checkpoint`, with the size and sha256 of the bytes it read (one open file for both)."""
    obj, record = _read(path, record=True)
    assert record is not None
    return obj, record


def _read(path: Path, record: bool) -> tuple[Any, FileRecord | None]:
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist; {_USAGE}")
    if path.is_dir():
        raise ValueError(
            f"'{path}' is a directory; give the checkpoint file itself (e.g. .../checkpoints/last.ckpt)"
        )
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        taken = FileRecord(size, _sha256(fh)) if record else None
        return _load(path, fh, size), taken


def _load(path: Path, fh: BinaryIO, size: int) -> Any:
    if _is_safetensors(fh, size):
        from safetensors.torch import load

        try:
            return load(_head(fh, size))
        except Exception as err:  # safetensors' own error type is not a ValueError
            raise ValueError(_damaged(path, "safetensors", err)) from err
    names = _zip_names(fh)
    if names is not None and any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        raise ValueError(
            f"'{path}' is a TorchScript archive (torch.jit.save), which holds code; {_USAGE} (or the state_dict() of "
            "torch.jit.load(path) saved with torch.save)"
        )
    if names is not None and not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        names = None  # a zip, but not one torch.save wrote (an .npz, a zipped folder)
    elif names is None and _head(fh, 4) == b"PK\x03\x04":  # the start of a zip, without its end
        raise ValueError(_damaged(path, "torch.load", "the zip file ends before its directory"))
    if names is None and not _is_legacy_torch(fh):
        raise ValueError(f"'{path}' is not a PyTorch checkpoint (torch.save / .safetensors file); {_USAGE}")
    try:
        fh.seek(0)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable content
        message = str(err)
        if "Weights only load failed" not in message:
            raise ValueError(_damaged(path, "torch.load", err)) from err
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", message)
        what = f"the Python object {found.group(1)}" if found else "Python objects other than tensors"
        raise ValueError(
            f"'{path}' holds {what}, which torch.load(weights_only=True) refuses; checkpoints are never unpickled in "
            "full (that can run code), whatever they claim to be: if you trust the file, re-save just its weights: "
            "torch.save(torch.load(path, weights_only=False)[...], 'weights.pth')"
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


def _only_other(path: Path, which: str, other: str, hint: str = "") -> ValueError:
    return ValueError(
        f"'{path}' holds no {which} backbone, only the {other}'s; use which='{other}' (dora validate: "
        f"--evaluator.which {other}, dora-export and dora visualize: --which {other}){hint}"
    )


def vit_sizes(weights: Mapping[str, Tensor]) -> dict[str, int]:
    """``embed_dim``, ``patch_size`` and ``depth`` of DINO-layout ViT weights, those the weights show (``depth`` 0:
    no ``blocks.N.*`` weights)."""
    sizes: dict[str, int] = {}
    if "cls_token" in weights:
        sizes["embed_dim"] = int(weights["cls_token"].shape[-1])
    if "patch_embed.proj.weight" in weights:
        sizes["patch_size"] = int(weights["patch_embed.proj.weight"].shape[-1])
    blocks = {int(m.group(1)) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k))}
    sizes["depth"] = max(blocks) + 1 if blocks else 0
    return sizes


def infer_architecture(
    weights: Mapping[str, Tensor], path: Path, num_heads: int | None
) -> tuple[str, dict[str, Any], int]:
    """timm name, overrides (without img_size) and image size of DINO-layout ViT weights."""
    sizes = vit_sizes(weights)
    embed_dim, patch_size, depth = sizes["embed_dim"], sizes["patch_size"], sizes["depth"]
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


def _from_lightning(path: Path, obj: Mapping[str, Any], which: Which, num_heads: int | None) -> Spec:
    state = obj["state_dict"]
    found = {w for w in ("teacher", "student") if any(k.startswith(f"{w}.backbone.") for k in state)}
    if not found:
        raise _no_backbone(path, obj)
    if which not in found:
        raise _only_other(path, which, found.pop())
    prefix = f"{which}.backbone."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    hp = obj.get("hyper_parameters")
    if not isinstance(hp, Mapping) or not isinstance(hp.get("backbone"), str):
        if _backbone_weights(weights) is None:
            raise _no_backbone(path, obj)
        name, kwargs, size = infer_architecture(weights, path, num_heads)
        return Spec("lightning", which, weights, name, kwargs, size)
    overrides = {k: hp[k] for k in ("patch_size", "depth", "embed_dim", "num_heads") if hp.get(k) is not None}
    return Spec("lightning", which, weights, hp["backbone"], overrides, int(hp.get("img_size", 224)))


def _from_export(path: Path, obj: Mapping[str, Any], which: Which) -> Spec:
    name, kwargs, state = obj.get("model_name"), obj.get("model_kwargs"), obj.get("state_dict")
    if not isinstance(name, str) or not isinstance(kwargs, Mapping) or not _is_tensor_dict(state):
        raise ValueError(
            f"'{path}' says it is a {EXPORT_FORMAT} file but lacks a model_name, model_kwargs or state_dict; "
            "export it again with dora-export"
        )
    stored = obj.get("which")
    if which == "student" and stored == "teacher":
        raise _only_other(
            path, "student", "teacher", "; or export the student: dora-export CKPT OUT --which student"
        )
    kwargs = dict(kwargs)
    size = int(kwargs.pop("img_size", 224))
    return Spec(
        "exported", stored if stored in ("teacher", "student") else None, dict(state), name, kwargs, size
    )


def _from_official(path: Path, obj: Mapping[str, Any], which: Which, num_heads: int | None) -> Spec:
    sections = {w: obj[w] for w in ("teacher", "student") if _is_tensor_dict(obj.get(w))}
    found = {w: weights for w, s in sections.items() if (weights := _backbone_weights(s)) is not None}
    if not found:
        raise _no_backbone(path, obj)
    if which not in found:
        raise _only_other(path, which, next(iter(found)))
    weights = found[which]
    name, kwargs, size = infer_architecture(weights, path, num_heads)
    return Spec("official", which, weights, name, kwargs, size)


def select_backbone(path: Path, obj: Any, which: Which, num_heads: int | None) -> Spec:
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
        name, kwargs, size = infer_architecture(weights, path, num_heads)
        return Spec("state_dict", None, weights, name, kwargs, size)
    raise _no_backbone(path, obj)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (a checkpoint, for the record of what was evaluated or visualised), read in blocks."""
    with Path(path).open("rb") as fh:
        return _sha256(fh)
