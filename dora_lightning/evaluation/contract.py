"""The evaluator plugin contract: ``dora validate --evaluator NAME`` runs an :class:`Evaluator` on a frozen backbone.

An evaluator is a class whose ``__init__`` arguments (typed, with defaults and a docstring) become the
``--evaluator.*`` options of ``dora validate`` and the ``evaluator.init_args`` of a YAML config. Given the backbone
the CLI loaded from ``--ckpt_path`` (with ``which`` and ``image_size`` taken from the evaluator), :meth:`Evaluator.evaluate`
builds its own data and LightningModule, runs a ``Trainer(**trainer_kwargs)`` and returns its metrics; the CLI then
writes them with :meth:`Evaluator.protocol` to ``results_<name>.json``. See docs/plugins.md.

An evaluator that finds its data missing or malformed raises :class:`EvaluationDataError` (or
:class:`EvaluationDataNotFoundError`) with a one-line message naming the file and the fix; ``dora validate`` prints
that line as an error, without a traceback.
"""

from __future__ import annotations

import abc
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:  # annotations only: the data readers import this module's errors without importing timm
    from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "EvaluationDataError",
    "EvaluationDataNotFoundError",
    "Evaluator",
    "EvaluatorSettingError",
    "evaluator_name",
]

# constructor arguments that change how fast an evaluation runs or where it writes, not what it measures
_NOT_PROTOCOL = frozenset({"num_workers", "output_dir"})


class EvaluationDataError(ValueError):
    """The evaluation data is missing or malformed; the message names the file and the fix.

    Raised by the data readers of the evaluators (a missing folder, a malformed layout, an unreadable image, a mask of
    the wrong mode, size or label range). ``dora validate --evaluator`` reports it as one line on stderr and exits
    with status 2 instead of printing a traceback. A ``ValueError``, so callers that catch those still do.
    """


class EvaluationDataNotFoundError(EvaluationDataError, FileNotFoundError):
    """A file or folder of the evaluation data is missing; also a ``FileNotFoundError``."""


class EvaluatorSettingError(ValueError):
    """An evaluator option that does not fit the checkpoint, the data or the run; the message names the option and
    the fix.

    Raised when the evaluation starts, where an option meets what it is applied to: ``n_last_blocks`` above the
    backbone's depth, a ``k`` above the number of training images, a strategy the evaluator cannot run under.
    Reported as :class:`EvaluationDataError` is: one line on stderr, exit status 2, nothing written.
    """


def evaluator_name(cls: type) -> str:
    """The short name of an evaluator class: its ``name`` attribute, else its class name in lower case."""
    name = getattr(cls, "name", None)
    return name if isinstance(name, str) and name else cls.__name__.lower()


class Evaluator(abc.ABC):
    """A plugin: builds its data and its LightningModule around a frozen backbone, runs, and returns metrics.

    Subclasses set the class attribute ``name`` (the short name, e.g. ``"knn"``), add their own typed ``__init__``
    arguments (stored as attributes of the same name) and call ``super().__init__(...)``; they implement
    :meth:`evaluate` and may extend :meth:`protocol`.

    Args:
        data_dir: folder holding ``train/<class>/*`` and ``val/<class>/*`` images (ImageFolder layout).
        image_size: side of the square images fed to the backbone; the backbone's position embedding is
            interpolated to it when the checkpoint was trained at another size.
        batch_size: images per batch per process.
        num_workers: dataloader worker processes (0 loads in the main process).
        which: the backbone to evaluate, ``teacher`` (as DINO and DoRA report) or ``student``.
        output_dir: where ``results_<name>.json`` is written; default ``<trainer.default_root_dir or cwd>/eval/<name>``.
    """

    name: ClassVar[str]

    def __init__(
        self,
        data_dir: str = "assets/fashion_mnist",
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 2,
        which: Literal["teacher", "student"] = "teacher",
        output_dir: str | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"evaluator image_size must be >= 1, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"evaluator batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"evaluator num_workers must be >= 0, got {num_workers}")
        if which not in ("teacher", "student"):
            raise ValueError(f"evaluator which must be 'teacher' or 'student', got {which!r}")
        self.data_dir = data_dir
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.which = which
        self.output_dir = output_dir

    @abc.abstractmethod
    def evaluate(self, backbone: VisionTransformer, trainer_kwargs: dict[str, Any]) -> dict[str, float]:
        """Evaluate ``backbone`` (frozen, eval mode) and return ``{metric name: value}``.

        Builds a ``lightning.pytorch.Trainer(**trainer_kwargs)`` (the ``trainer.*`` options of the command line: devices,
        precision, logger, ...) and runs it (``validate``, or ``fit`` then ``validate``). Under DDP it runs in every
        process and must return the same metrics in each.
        """

    def resolved_output_dir(self, trainer_kwargs: dict[str, Any]) -> Path:
        """Where ``results_<name>.json`` (and any file the evaluation writes) goes: ``output_dir``, else
        ``<trainer default_root_dir or cwd>/eval/<name>``."""
        if self.output_dir:
            return Path(self.output_dir)
        return (
            Path(trainer_kwargs.get("default_root_dir") or Path.cwd()) / "eval" / evaluator_name(type(self))
        )

    def protocol(self) -> dict[str, Any]:
        """The settings that define the protocol, for the results file.

        By default every ``__init__`` argument stored as an attribute of the same name, except ``num_workers`` and
        ``output_dir``, plus ``evaluator`` (the short name), ``class_path`` and ``data_path`` (``data_dir`` made
        absolute). Subclasses may add facts learnt while evaluating (number of classes and images, ...).
        """
        cls = type(self)
        settings: dict[str, Any] = {
            "evaluator": evaluator_name(cls),
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
        }
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for param in inspect.signature(init).parameters.values():
                if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    continue
                if param.name not in _NOT_PROTOCOL and hasattr(self, param.name):
                    settings[param.name] = getattr(self, param.name)
        if isinstance(getattr(self, "data_dir", None), str):
            settings["data_path"] = str(Path(self.data_dir).resolve())
        return settings

    def __repr__(self) -> str:
        args = ", ".join(
            f"{k}={v!r}" for k, v in self.protocol().items() if k not in ("evaluator", "class_path")
        )
        return f"{type(self).__name__}({args})"
