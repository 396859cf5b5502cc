"""Find evaluator plugins: the ``dora.evaluators`` entry-point group, plus built-ins for plain checkouts.

Installed packages register evaluators in their ``pyproject.toml``::

    [project.entry-points."dora.evaluators"]
    toy = "toy_eval:ToyEvaluator"

:func:`available_evaluators` lists the names without importing anything; :func:`get_evaluator_class` imports only
the one asked for, by short name (``knn``), by class name of a registered plugin (``KNNEvaluator``) or by import path
(``pkg.mod:Class`` or ``pkg.mod.Class``, registered or not).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from dora_lightning.evaluation.contract import Evaluator

__all__ = [
    "BUILTIN_EVALUATORS",
    "ENTRY_POINT_GROUP",
    "EvaluatorImportError",
    "RegisteredEvaluator",
    "available_evaluators",
    "class_path_of",
    "get_evaluator_class",
    "import_registered",
]

ENTRY_POINT_GROUP = "dora.evaluators"
_OWN_DISTRIBUTION = "dora-lightning"

# what pyproject.toml registers; used as well when dora-lightning runs from a checkout that pip never installed
BUILTIN_EVALUATORS: dict[str, str] = {
    "knn": "evaluators.knn:KNNEvaluator",
    "linear": "evaluators.linear:LinearProbeEvaluator",
    "segmentation": "evaluators.segmentation:SegmentationEvaluator",
    "davis": "evaluators.davis:DavisEvaluator",
}


class EvaluatorImportError(ImportError):
    """A registered or named evaluator exists but its module could not be imported (or holds no such class)."""


@dataclass(frozen=True)
class RegisteredEvaluator:
    """One registered evaluator: short ``name``, ``target`` ``module:attr`` and the distribution that registers it."""

    name: str
    target: str
    distribution: str

    @property
    def class_name(self) -> str:
        return self.target.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def _normalise_dist(name: str | None) -> str:
    return (name or "").lower().replace("_", "-")


# the warnings this process has printed: each once, however often the registry is read
_WARNED: set[str] = set()
_SUBCOMMANDS = ("fit", "validate", "compare")


def _warn_once(message: str) -> None:
    """``dora SUBCOMMAND: warning: MESSAGE``, one line on stderr, the first time this process meets it (the registry
    is read several times per command: it was printed up to three times, each with a code path in front)."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    argv = sys.argv
    command = argv[1] if Path(argv[0]).name == "dora" and len(argv) > 1 and argv[1] in _SUBCOMMANDS else ""
    prog = f"dora {command}" if command else "dora"
    sys.stderr.write(f"{prog}: warning: {message}\n")


def available_evaluators() -> dict[str, RegisteredEvaluator]:
    """Registered evaluators by short name, sorted, without importing them.

    dora-lightning's own names (``knn``, ``linear``, ...) always map to its classes; another distribution that
    registers one of them is ignored with a warning, printed once per process (its class stays usable by class
    path).
    """
    found = {
        name: RegisteredEvaluator(name, target, _OWN_DISTRIBUTION)
        for name, target in BUILTIN_EVALUATORS.items()
    }
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = _normalise_dist(getattr(getattr(ep, "dist", None), "name", None)) or "unknown"
        current = found.get(ep.name)
        if current is None:
            found[ep.name] = RegisteredEvaluator(ep.name, ep.value, dist)
        elif current.target != ep.value and dist != _OWN_DISTRIBUTION:
            _warn_once(
                f"evaluator name {ep.name!r} registered by {dist} ({ep.value}) is already taken by "
                f"{current.distribution} ({current.target}); use --evaluator {ep.value} to run it"
            )
        elif dist == _OWN_DISTRIBUTION:  # the installed metadata wins over the built-in table
            found[ep.name] = RegisteredEvaluator(ep.name, ep.value, dist)
    return dict(sorted(found.items()))


def _known_list() -> str:
    return ", ".join(available_evaluators())


def _import_target(target: str, what: str) -> type:
    """Import ``module:attr`` or ``module.attr`` (attr may be dotted with ':') and return it; ``what`` names it in
    the messages (``evaluator 'toy' (toy_eval:ToyEvaluator, registered by toy-dist)``)."""
    if ":" in target:
        module_name, _, attr = target.partition(":")
    else:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{what}: {target!r} is not an import path (pkg.module:Class or pkg.module.Class)")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a plugin's import may fail in any way
        raise EvaluatorImportError(f"{what} failed to import: {type(err).__name__}: {err}") from err
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EvaluatorImportError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, type) or not issubclass(obj, Evaluator):
        raise ValueError(
            f"{what} is not a subclass of dora_lightning.evaluation.contract.Evaluator (got {obj!r}); see "
            "docs/plugins.md"
        )
    return obj


def _registered_what(entry: RegisteredEvaluator) -> str:
    return f"evaluator {entry.name!r} ({entry.target}, registered by {entry.distribution})"


def get_evaluator_class(name_or_class_path: str | type) -> type[Evaluator]:
    """The evaluator class for a short name (``knn``), a registered class name or ``pkg.mod:Class``/``pkg.mod.Class``.

    Raises:
        ValueError: the name is unknown (the message lists the known ones), or the target is not an Evaluator.
        EvaluatorImportError: the evaluator is registered or named but its module fails to import.
    """
    if isinstance(name_or_class_path, type):
        if not issubclass(name_or_class_path, Evaluator):
            raise ValueError(
                f"{name_or_class_path!r} is not a subclass of dora_lightning.evaluation.contract.Evaluator"
            )
        return name_or_class_path
    name = str(name_or_class_path).strip()
    registered = available_evaluators()
    if name in registered:
        entry = registered[name]
        return _import_target(entry.target, _registered_what(entry))
    by_class = [e for e in registered.values() if e.class_name == name]
    if len(by_class) == 1:
        entry = by_class[0]
        return _import_target(entry.target, _registered_what(entry))
    if ":" in name or "." in name:
        return _import_target(name, f"evaluator class {name!r}")
    raise ValueError(
        f"unknown evaluator {name!r}; known: {_known_list()}; or give a class_path (pkg.module:Class)"
    )


def class_path_of(cls: type) -> str:
    """``module.Class``: the dotted class path jsonargparse and YAML configs use."""
    return f"{cls.__module__}.{cls.__qualname__}"


def import_registered() -> dict[str, str]:
    """Import every registered evaluator, so that jsonargparse resolves their class names (``KNNEvaluator``).

    Returns ``{name: error message}`` for those that fail to import; they are skipped, not raised, so that one
    broken plugin does not break the others (asking for it by name raises the error).
    """
    failures: dict[str, str] = {}
    for name in available_evaluators():
        try:
            get_evaluator_class(name)
        except (ImportError, ValueError) as err:
            failures[name] = str(err)
    return failures
