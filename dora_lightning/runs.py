"""A training run's folder and what may resume it.

A run lives in ``trainer.default_root_dir``: its checkpoints in ``<default_root_dir>/checkpoints`` unless a
``ModelCheckpoint`` names another ``dirpath``, so two runs with different folders never share a ``last.ckpt``.
``--ckpt_path last`` means the newest checkpoint in this run's checkpoint folders (or a new run when there is none).
A checkpoint resumes only the run it belongs to: the model settings must be the checkpoint's (checked here, before
Lightning reads the file), the data the checkpoint's (checked by ``VideoClipDataModule.load_state_dict``);
``--init_from`` starts a new run from another run's weights instead. A resumed run logs on in the run's newest
TensorBoard folder, from the checkpoint's step.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dora_lightning.checkpoint_formats import (
    EXPORT_FORMAT,
    PRETRAIN_KIND,
    _summary,
    read_checkpoint,
    vit_sizes,
)
from dora_lightning.checkpoint_io import AtomicCheckpointIO

CHECKPOINT_FOLDER = "checkpoints"
LAST = "last"
# model options that change no weight and no training step: they may differ on resume (batch_size, the batch per
# process, may change with the number of processes: the data module checks the global batch instead)
NOT_PART_OF_THE_RUN = frozenset(
    {
        "log_images_every_n_steps",
        "diagnostics_every_n_steps",
        "compile",
        "grad_checkpointing",
        "batch_size",
        "_instantiator",
        "_class_path",
    }
)


# model options linked from another section's (LightningCLI link_arguments): a difference is named by its source
LINKED_FROM = {"seed": "data.seed"}


class CheckpointRefused(ValueError):
    """``--ckpt_path`` / ``--init_from`` names a file this run cannot use; the message says which and why."""


def is_remote(path: str | os.PathLike[str] | None) -> bool:
    """A path of a remote file system (``s3://...``), left to Lightning's file systems."""
    return path is not None and "://" in str(path)


def local_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with a leading ``~`` expanded, as Lightning expands ``default_root_dir`` and a ``ModelCheckpoint``'s
    ``dirpath`` when it writes (a config's ``~/runs/x``, or ``--trainer.default_root_dir=~/x``, which the shell does
    not expand): looked up anywhere else, ``--ckpt_path last`` would search a folder named ``~``."""
    return Path(os.path.expanduser(os.fspath(path)))


def default_checkpoint_folder(default_root_dir: str | os.PathLike[str] | None) -> Path:
    """``<default_root_dir>/checkpoints`` (the working directory when no root is set; ``~`` expanded)."""
    return local_path(default_root_dir or os.getcwd()) / CHECKPOINT_FOLDER


def _plain(value: Any) -> Any:
    """A config value as plain Python (jsonargparse Namespaces as dicts, tuples as lists) for comparison."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _is_model_checkpoint(class_path: Any) -> bool:
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, ModelCheckpoint)


def checkpoint_folders(trainer_config: Mapping[str, Any]) -> list[Path]:
    """The folders the trainer configured by ``trainer_config`` (the ``trainer`` section of a config) writes
    checkpoints to; the default folder when only Lightning's default ``ModelCheckpoint`` would be used."""
    config = _plain(trainer_config)
    root = config.get("default_root_dir")
    folders: list[Path] = []
    callbacks = config.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(callback, Mapping) and _is_model_checkpoint(callback.get("class_path")):
            dirpath = (callback.get("init_args") or {}).get("dirpath")
            folders.append(local_path(dirpath) if dirpath else default_checkpoint_folder(root))
    if not folders and config.get("enable_checkpointing", True) is not False:
        folders.append(default_checkpoint_folder(root))
    return list(dict.fromkeys(folders))


def find_last_checkpoint(folders: Iterable[Path]) -> Path | None:
    """What ``--ckpt_path last`` resumes: the ``.ckpt`` (a file, or a link to one) in ``folders`` furthest into the run
    (the largest ``global_step`` it holds), whatever its name (``last.ckpt``, a rolling mid-epoch checkpoint written
    after it, ...); the newest of those by modification time. By modification time alone, a run folder copied
    without its times (``cp -r``) resumed an older stop's checkpoint."""
    candidates = [
        path
        for folder in folders
        if folder.is_dir()
        for path in folder.iterdir()
        if path.suffix == ".ckpt" and not path.name.startswith(".") and path.is_file()
    ]
    return (
        max(candidates, key=lambda p: (_global_step(p), p.stat().st_mtime_ns, LAST in p.name))
        if candidates
        else None
    )


def _global_step(path: Path) -> int:
    """The ``global_step`` a Lightning checkpoint holds (read through a memory map: the weights are not read), or -1
    for a file that is not one."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file ranks last; resuming it says what is wrong
        return -1
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return step if isinstance(step, int) else -1


def model_differences(model_config: Mapping[str, Any], hyper_parameters: Mapping[str, Any]) -> list[str]:
    """``model.KEY checkpoint -> now`` for each model option whose value differs from the checkpoint's (options the
    checkpoint does not record, and :data:`NOT_PART_OF_THE_RUN`, are not compared); an option linked from another
    section is named by the option the user sets (``data.seed``, not ``model.seed``)."""
    now, saved = _plain(model_config), _plain(hyper_parameters)
    return [
        f"{LINKED_FROM.get(key, f'model.{key}')} {saved[key]!r} -> {value!r}"
        for key, value in now.items()
        if key in saved and key not in NOT_PART_OF_THE_RUN and saved[key] != value
    ]


def describe_checkpoint(obj: Any) -> str:
    """What a checkpoint that `dora fit` did not write holds, in a few words, for error messages."""
    from torch import Tensor

    if not isinstance(obj, dict):
        return f"a saved {type(obj).__name__}"
    if obj.get("format") == EXPORT_FORMAT:
        return "a backbone written by dora-export"
    if "state_dict" in obj and "pytorch-lightning_version" in obj:
        return "a Lightning checkpoint of another model (no 'dora' section)"
    if "teacher" in obj or "student" in obj:
        return "an official DINO/DoRA checkpoint"
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return f"a plain state dict ({len(obj)} tensors)"
    return f"a dict without Lightning's keys (keys: {_summary(obj)})"


def read_fit_checkpoint(path: Path, option: str, usage: str, refusal: str) -> dict[str, Any]:
    """Read ``path`` safely (``weights_only=True``: a pickle that would run code is refused, never executed) and
    return it when it is a `dora fit` checkpoint; otherwise raise :class:`CheckpointRefused` (``option: ...``,
    ``usage`` saying what the option takes, ``refusal`` what the command does with our checkpoints only)."""
    from dora_lightning.checkpoint_formats import _USAGE

    try:
        obj = read_checkpoint(path)
    except FileNotFoundError as err:
        raise CheckpointRefused(f"{option}: '{path}' does not exist; {usage}") from err
    except ValueError as err:
        raise CheckpointRefused(f"{option}: {str(err).replace(_USAGE, usage)}") from err
    section = obj.get("dora") if isinstance(obj, dict) else None
    if (
        isinstance(section, dict)
        and section.get("kind") == PRETRAIN_KIND
        and isinstance(obj.get("state_dict"), dict)
    ):
        return obj
    raise CheckpointRefused(
        f"{option}: '{path}' is {describe_checkpoint(obj)}, not a `dora fit` checkpoint: {refusal}; evaluate these "
        f"weights with `dora validate --evaluator knn --ckpt_path {path}`"
    )


# what Lightning needs to resume a run from a checkpoint, beyond its weights (a `save_weights_only` checkpoint and
# `dora compare`'s random_init.ckpt have the weights alone: Lightning then fails with a KeyError)
RUN_STATE_KEYS = ("pytorch-lightning_version", "optimizer_states", "loops")


def refuse_weights_only(path: Path, checkpoint: Mapping[str, Any], picked_by_last: bool = False) -> None:
    """Raise :class:`CheckpointRefused` when ``checkpoint`` holds weights but not the run's state (optimiser, loops):
    it cannot be resumed, only started from (``--init_from``)."""
    if all(key in checkpoint for key in RUN_STATE_KEYS):
        return
    section = checkpoint.get("dora")
    if isinstance(section, Mapping) and section.get("random_init"):
        what = "`dora compare`'s random initialisation (weights only): there is no run to resume"
    else:
        what = (
            "a run's weights without its optimiser and loop state (a ModelCheckpoint with save_weights_only: true "
            "writes such files), so the run cannot be resumed from it"
        )
    picked = " (--ckpt_path last picked it: the newest checkpoint of this run)" if picked_by_last else ""
    raise CheckpointRefused(
        f"--ckpt_path: '{path}'{picked} is {what}; start a new run from its weights with --init_from {path}"
        + (" (and leave save_weights_only off for checkpoints that resume)" if picked_by_last else "")
    )


def refuse_other_model(path: Path, checkpoint: Mapping[str, Any], model_config: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointRefused` naming the model options that differ from those ``checkpoint`` was trained
    with: a resume continues that run unchanged."""
    differences = model_differences(model_config, checkpoint.get("hyper_parameters") or {})
    if differences:
        which = "model settings" if all(d.startswith("model.") for d in differences) else "settings"
        raise CheckpointRefused(
            f"--ckpt_path: '{path}' belongs to a run with other {which} ({', '.join(differences)}); resume "
            f"with the checkpoint's settings, or start a new run from its weights with --init_from {path}"
        )


def _with_built_sizes(model_config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``model_config`` (as plain values) with the backbone sizes it leaves unset (None: the timm model's own) read
    from the student backbone's weights in ``state_dict``, so that a refusal names real sizes (``model.embed_dim
    192 -> 96``, not ``None -> 96``)."""
    config = dict(_plain(model_config))
    prefix = "student.backbone."
    built = vit_sizes({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})
    for key, value in built.items():
        if value and key in config and config[key] is None:
            config[key] = value
    return config


def load_initial_weights(module: Any, path: Path, model_config: Mapping[str, Any]) -> None:
    """``--init_from``: load the weights (student, teacher, heads, centre) of another run's `dora fit` checkpoint into
    ``module`` for a new run (fresh optimiser, schedules and data position); the architecture must match."""
    checkpoint = read_fit_checkpoint(
        path,
        "--init_from",
        "`--init_from` takes a .ckpt written by `dora fit`",
        "`--init_from` starts from our own runs' weights",
    )
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:  # missing, unexpected or differently shaped tensors
        saved = _with_built_sizes(checkpoint.get("hyper_parameters") or {}, checkpoint["state_dict"])
        now = _with_built_sizes(model_config, module.state_dict())
        first = str(err).strip().splitlines()[-1].strip()
        differences = model_differences(now, saved) or [first]
        raise CheckpointRefused(
            f"--init_from: '{path}' holds another architecture ({', '.join(differences)}); use a checkpoint of the "
            "same backbone and head sizes"
        ) from err


def trainer_checkpoint_folder(trainer: Any) -> Path | None:
    """The folder of the trainer's first checkpoint callback (where ``--ckpt_path last`` looks), or None without
    one."""
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            return Path(dirpath)
    return None


def use_run_folder(trainer: Any) -> None:
    """Point every ``ModelCheckpoint`` without a ``dirpath`` at ``<default_root_dir>/checkpoints`` (Lightning would
    pick a new ``lightning_logs/version_N`` folder each run, where ``--ckpt_path last`` cannot find it) and write
    checkpoints atomically (:class:`AtomicCheckpointIO`) unless another ``CheckpointIO`` plugin was given."""
    folder = os.path.realpath(default_checkpoint_folder(trainer.default_root_dir))
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = folder
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def continue_run_log(trainer: Any, step: int) -> Path | None:
    """Make a resumed run log on in the run's newest TensorBoard folder (``<default_root_dir>/lightning_logs/
    version_N``) from ``step``, the checkpoint's: TensorBoard hides what the stopped run logged at that step and after
    (SummaryWriter's ``purge_step``), so the run's curves stay one run instead of a new ``version_N`` per restart.
    Only for Lightning's default logger (an explicit ``--trainer.logger`` is left as given); returns the folder, or
    None when there is none yet (the run logged nothing before it stopped)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = trainer.logger
    if type(logger) is not TensorBoardLogger:
        return None
    root = Path(logger.root_dir)
    versions = [path for path in root.glob("version_*") if path.is_dir()] if root.is_dir() else []
    if not versions:
        return None
    newest = max(versions, key=_last_written)
    trainer.logger = TensorBoardLogger(
        save_dir=logger.save_dir, name=logger.name, version=newest.name, purge_step=step
    )
    return newest


def _last_written(folder: Path) -> int:
    """The newest modification time (ns) of ``folder`` and the files in it."""
    return max([folder.stat().st_mtime_ns, *(p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file())])
