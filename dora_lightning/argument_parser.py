"""The argument parser of the `dora` subcommands: errors are one line on stderr with a "did you mean", exit status 2."""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import re
from collections.abc import Hashable
from contextvars import ContextVar
from typing import Any, NoReturn

import yaml
from jsonargparse import get_loader
from lightning.pytorch.cli import LightningArgumentParser

from dora_lightning.errors import exit_with_error


def did_you_mean(message: str, parser: Any) -> str:
    """`` did you mean --KEY?`` for the first unrecognized ``--key`` of ``message`` close to an option of ``parser``."""
    if "unrecognized arguments" not in message:
        return ""
    options = [
        o for action in getattr(parser, "_actions", []) for o in action.option_strings if o.startswith("--")
    ]
    for token in message.split("unrecognized arguments:", 1)[1].split():
        if token.startswith("--"):
            key = token.split("=", 1)[0]
            close = difflib.get_close_matches(key, options, n=1, cutoff=0.75)
            if close:
                return f"; did you mean {close[0]}?"
    return ""


_NOT_ACCEPTED = re.compile(
    r"""Parser key "([\w.]+)".*?Problem with given class_path '([\w.]+)': Option '(\w+)' is not accepted"""
)


def unknown_plugin_option(message: str) -> str | None:
    """jsonargparse's refusal of an option that a class given by ``class_path`` (an evaluator plugin) does not take,
    said in one short line with that class's options; None for any other message."""
    found = _NOT_ACCEPTED.search(message)
    if found is None:
        return None
    key, class_path, option = found.groups()
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        options = [
            name for name in inspect.signature(cls).parameters if name not in ("self", "args", "kwargs")
        ]
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    close = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
    guess = f"; did you mean --{key}.{close[0]}?" if close else ""
    return (
        f"--{key}.{option}: {class_name} has no option '{option}' (its options: {', '.join(options)}){guess}"
    )


# where a config or the command line names an evaluator plugin: `dora validate`'s, and `dora fit`'s eval_during's
VALIDATE_EVALUATOR = "evaluator"
FIT_EVALUATOR = "eval_during.evaluator"
EVALUATOR_KEYS = (VALIDATE_EVALUATOR, FIT_EVALUATOR)


_UNION_FAILED = "Does not validate against any of the Union subtypes"
_LITERAL = re.compile(r"^Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$")
_PLAIN_KEY = re.compile(r'^Parser key "([\w.]+)": (Expected a typing\.Literal\[.*)$')
_CLASS_OPTION = re.compile(
    r'^Parser key "([\w.]+)": ' + _UNION_FAILED + r" .*?Errors: - Problem with given class_path '[\w.]+': "
    r'Parser key "(\w+)": (.*?)(?: - Expected a <class \'NoneType\'>)? Given value type: '
)


def option_name(key: str, option: str) -> str:
    """How a message names ``option`` of the class given at ``key``: an evaluator's as its command-line flag
    (``--evaluator.ks``), others (``data.transform``) as their config key (``data.transform.init_args.hue``)."""
    return f"--{key}.{option}" if key in EVALUATOR_KEYS else f"{key}.init_args.{option}"


def _value_problem(name: str, problem: str) -> str:
    """``NAME: PROBLEM``; a value outside a Literal's set as ``NAME must be one of 'a', 'b', got V``."""
    literal = _LITERAL.match(problem)
    if literal is not None:
        allowed, given = literal.groups()
        return f"{name} must be one of {allowed}, got {given}"
    return f"{name}: {problem}"


def refused_option_value(message: str) -> str | None:
    """jsonargparse's refusal of a value at parse time, said in one short line naming the option: a value outside
    a Literal's set (``model.mask_mode must be one of 'keep', 'remove', got nope``), or any refused value of an
    option of a class given by ``class_path`` (``data.transform.init_args.crop_backend ...``, ``--evaluator.optimizer
    ...``), which jsonargparse buries in its "Does not validate against any of the Union subtypes" text; None for
    any other message."""
    nested = _CLASS_OPTION.match(message)
    if nested is not None:
        key, option, problem = nested.groups()
        return _value_problem(option_name(key, option), problem.strip())
    plain = _PLAIN_KEY.match(message)
    if plain is not None:
        return _value_problem(*plain.groups())
    return None


def _instantiated_key(err: BaseException) -> str | None:
    """The key (``data.transform``) jsonargparse's ``instantiate`` was instantiating when ``err`` was raised."""
    key = None
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "instantiate" and frame.f_code.co_filename.endswith("_instantiation.py"):
            key = getattr(frame.f_locals.get("component"), "dest", None) or key
        tb = tb.tb_next
    return key


def refused_init_value(err: ValueError) -> ValueError | None:
    """A class given by ``class_path`` (``data.transform``: ClipMultiCrop) that refused a value when it was built
    (``hue must be in [0, 0.5], got 0.7``) comes out of jsonargparse as a ValueError of its own, "Does not validate
    against any of the Union subtypes ... Given value: Namespace(...)", which is not one of our user errors and was
    printed as a traceback; this is the class's own error, naming the option (``data.transform.init_args.hue: hue
    must be ...``), with the class's traceback (so that `dora` prints it in one line, or with ``--verbose`` in full).
    None for any other error, and for the evaluators', which `dora validate` and ``eval_during`` report themselves."""
    from dora_lightning.errors import is_user_error, one_line

    cause = err.__cause__
    if (
        not str(err).startswith(_UNION_FAILED)
        or not isinstance(cause, ValueError)
        or not is_user_error(cause)
    ):
        return None
    key = _instantiated_key(err)
    if key is None or key in EVALUATOR_KEYS:
        return None
    reason = one_line(cause)
    word = re.match(r"\w+", reason)
    named = word is not None and re.search(rf"\b{word.group()}=", str(err)) is not None
    option = option_name(key, word.group()) if named else key
    return ValueError(f"{option}: {reason}").with_traceback(cause.__traceback__)


def resolve_config_evaluators(config: Any) -> list[str]:
    """Resolve, in a loaded config (``config``, changed in place), an evaluator named by its registered short name
    or class name (``evaluator: knn``, ``class_path: knn``, ``class_path: KNNEvaluator``) at :data:`EVALUATOR_KEYS`
    to its class path, as the command line's ``--evaluator knn`` is; the keys resolved. Raises ValueError naming the
    key for an unknown name."""
    from dora_lightning.evaluation.runner import resolve_evaluator_value

    resolved = []
    for name in EVALUATOR_KEYS:
        *parents, leaf = name.split(".")
        holder = config
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict):
            continue
        value = holder.get(leaf)
        target, field = (holder, leaf) if isinstance(value, str) else (value, "class_path")
        short = target.get(field) if isinstance(target, dict) else None
        if not isinstance(short, str) or "." in short or ":" in short:
            continue  # a class path is jsonargparse's; a name (knn, KNNEvaluator) resolves as on the command line
        try:
            target[field] = resolve_evaluator_value(short)
        except (ValueError, ImportError) as err:
            raise ValueError(f"{name}: {err}") from err
        resolved.append(name)
    return resolved


# the --config file being read (its path as given; jsonargparse passes on its base name only)
_CONFIG_FILE: ContextVar[str | None] = ContextVar("dora_config_file", default=None)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in a few words, with where it is (``did not find expected ',' or ']' at line 3, column 1``)."""

    def at(mark: Any) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    before = f"{context}{at(getattr(err, 'context_mark', None))}: " if context else ""
    return f"{before}{problem}{at(getattr(err, 'problem_mark', None))}"


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping of a config file (YAML forbids it; PyYAML keeps the last, silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping, naming both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # a list or mapping as a key: PyYAML's own error follows
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(
                    f"key '{key}' is given twice in one mapping (lines {lines[key]} and {line}); YAML keeps only "
                    "the last: remove the one you do not mean"
                )
            lines[key] = line
        return super().construct_mapping(node, deep)


def config_problem(content: str, sections: set[str]) -> str | None:
    """What is wrong with a config file's text, as the end of a one-line error naming the file; None when it loads
    as keys and values. A key given twice in one mapping is refused (YAML forbids it; PyYAML kept the last one
    silently, so ``base_lr`` set twice trained with the second). A top-level ``section`` (``model:``, ``data:``,
    ``trainer:``, ...) left empty, its keys all commented out, loads as null, which jsonargparse takes as "reset this section to its defaults" (``model``: the
    code's ViT-S/16 at 224 px instead of the base config's model, silently) or fails on (``trainer``: a TypeError)."""
    try:
        config = yaml.load(content, Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except _DuplicateKey as err:
        return str(err)
    except yaml.YAMLError as err:
        return f"not valid YAML: {_yaml_problem(err)}"
    if config is None:
        return "the file is empty (or all comments); give its keys, or leave out this --config"
    if not isinstance(config, dict):
        return f"a config maps keys to values (model:, data:, trainer:, ...), got a {type(config).__name__}"
    for key, value in config.items():
        if key not in sections:
            continue
        if value is None:
            return (
                f"section '{key}:' is empty (all its keys commented out?); remove the line or give its keys"
            )
        if not isinstance(value, dict):
            return (
                f"section '{key}:' holds the keys of {key}.*, got {value!r}; give its keys indented under it"
            )
    return None


class DoraArgumentParser(LightningArgumentParser):
    """A parser whose errors are one line on stderr (``dora fit: error: ...``; no usage text), exit status 2; in its
    config files an evaluator may be named by its short name (:func:`resolve_config_evaluators`); a config file that
    is not UTF-8 text, not YAML, empty, or has an empty section is refused naming the file (:func:`config_problem`)."""

    def parse_path(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        # a --config file: its name for the messages of _load_config_parser_mode; not UTF-8 text is one line
        token = _CONFIG_FILE.set(str(path))
        try:
            return super().parse_path(path, *args, **kwargs)
        except UnicodeDecodeError as err:
            byte = err.object[err.start : err.start + 1].hex()
            self.error(
                f"'{path}': not a UTF-8 text file (byte 0x{byte} at position {err.start}); --config takes a YAML "
                "file (saved as UTF-8)"
            )
        finally:
            _CONFIG_FILE.reset(token)

    def _sections(self) -> set[str]:
        """This parser's option groups (``model``, ``data``, ``trainer``, ...): the top-level keys whose value is a
        mapping of their options (jsonargparse loads each with a config action of its own, ``--model CONFIG``); not
        a key that takes a value itself, like ``evaluator: knn``."""
        return {
            action.dest
            for action in self._actions
            if type(action).__name__ == "_ActionConfigLoad" and "." not in action.dest
        }

    def _load_config_parser_mode(self, content: str, *args: Any, **kwargs: Any) -> Any:
        # jsonargparse's one place where a config's text becomes a dict (a file, a string, a default config)
        path = kwargs.get("path") or (args[0] if args else "")
        name = _CONFIG_FILE.get() or path
        if self.parser_mode in ("yaml", "omegaconf") and (sections := self._sections()):
            problem = config_problem(content, sections)
            if problem is not None:
                self.error(f"'{name}': {problem}" if name else f"--config: {problem}")
        if "evaluator" in content:  # the last part of every EVALUATOR_KEYS
            content = self._with_resolved_evaluators(content, path)
        return super()._load_config_parser_mode(content, *args, **kwargs)

    def _with_resolved_evaluators(self, content: str, path: Any) -> str:
        """``content`` with its evaluators' short names resolved (as JSON, which every parser mode reads, holding the
        values as this parser's loader read them); unchanged when there is nothing to resolve or it does not load."""
        try:
            config = get_loader(self.parser_mode)(content)
        except Exception:  # noqa: BLE001 - jsonargparse then says what is wrong with it
            return content
        try:
            changed = resolve_config_evaluators(config)
        except ValueError as err:
            self.error(f"{path or 'the config'}: {err}")
        return json.dumps(config) if changed else content

    def instantiate(self, *args: Any, **kwargs: Any) -> Any:
        # a value refused by a class given by class_path, e.g. ClipMultiCrop's hue 0.7: one line naming the option
        try:
            return super().instantiate(*args, **kwargs)
        except ValueError as err:
            refused = refused_init_value(err)
            if refused is None:
                raise
            raise refused from err

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # jsonargparse parses nested values with exit_on_error off and expects its ArgumentError; its documented
        # JSONARGPARSE_DEBUG environment variable asks for its own (full) errors
        debug = os.environ.get("JSONARGPARSE_DEBUG", "").lower() not in ("", "0", "false")
        if not self.exit_on_error or debug:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        plugin = unknown_plugin_option(text)
        if plugin is not None:
            exit_with_error(prog, f"{plugin} (options: {prog} --help)")
        refused = refused_option_value(text)
        if refused is not None:
            exit_with_error(prog, refused)
        exit_with_error(prog, f"{text}{did_you_mean(text, parser)} (options: {prog} --help)")
