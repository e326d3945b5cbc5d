"""Config loading, validation and the script entry wrapper shared by inference and training.

A run's config is one YAML file (optionally layered on a defaults YAML) plus OmegaConf dot-list
overrides from the command line (``model_kwargs.bank_size=4``). The defaults define the set of
known keys: a key that is not known is rejected with the closest known key, so a typo can never
silently fall back to a default. Every problem is raised as :class:`ConfigError` naming the field
and the fix; :func:`run_cli` turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.errors import ConfigError, MemFlowError

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*$")
_MISSING = object()
# Mappings passed whole to a constructor that checks their keys itself (``model_overrides`` to the DiT config,
# which names the unknown field): any of its fields may be set here, not only those the YAML happens to list.
OPEN_MAPPINGS = frozenset({"model_overrides"})


# --------------------------------------------------------------------------------------------
# Command line


_USAGE = "[--config_path PATH] [--logdir DIR] [--resume] [key=value ...]"


class _RaisingParser(argparse.ArgumentParser):
    """argparse exits with its own usage text on errors; we want one ConfigError line instead."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"command line: {message}; usage: {self.prog} {_USAGE}")


class ScriptParser(argparse.ArgumentParser):
    """A script's own options: a bad one is one ConfigError line pointing at ``--help``, not argparse's usage."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}; see python scripts/{self.prog} --help")


def parse_cli(
    argv: Sequence[str], default_config: str | None = None, prog: str | None = None
) -> tuple[str | None, dict[str, Any], list[str]]:
    """Split ``[--config_path PATH] [--logdir DIR] [--resume] [key=value ...]``.

    Returns ``(config_path or default_config, {"logdir": str|None, "resume": bool}, overrides)``;
    the overrides are checked for form here and against the known keys by :func:`load_config`.
    """
    parser = _RaisingParser(prog=prog, allow_abbrev=False, add_help=True)
    parser.add_argument("--config_path", default=default_config, help="YAML config file")
    parser.add_argument("--logdir", help="folder for logs and checkpoints (training)")
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --logdir")
    known, rest = parser.parse_known_args(list(argv))
    for token in rest:
        if token.startswith("-"):
            raise ConfigError(f"command line: unknown option {token!r}; usage: {parser.prog} {_USAGE}")
        _split_override(token)
    return known.config_path, {"logdir": known.logdir, "resume": known.resume}, list(rest)


def _split_override(token: str) -> str:
    """The key of a ``key=value`` token; anything else is a ConfigError showing the expected form."""
    key, sep, _ = token.partition("=")
    if not sep or not key:
        raise ConfigError(
            f"override {token!r} is not of the form key=value "
            "(e.g. output_folder=videos or model_kwargs.bank_size=4)"
        )
    if not _KEY_RE.match(key):
        raise ConfigError(f"override key {key!r} is not a dotted name like model_kwargs.bank_size")
    return key


def run_cli(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a script's ``main(argv)`` and exit with its code.

    A :class:`MemFlowError` becomes one line ``error: <message>`` on stderr and exit code 2 (no
    traceback: the message already names the field and the fix); Ctrl-C exits with 130.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(args)
    except MemFlowError as err:
        message = " ".join(str(err).split()) or type(err).__name__
        # one write of the whole line: print() writes the text and the newline separately, and the ranks of
        # a torchrun job share stderr, so their lines could run together
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))


# --------------------------------------------------------------------------------------------
# Loading


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _load_yaml(path: str | Path, role: str) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{role} {path} {what}; pass an existing YAML file")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{role} {path} cannot be read: {err}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {_one_line(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value, not a list")
    return loaded


def _known_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield path
            yield from _known_paths(value, path + ".")


def _lookup(tree: Any, dotted: str) -> Any:
    """The value at a dotted path of a plain container tree, or ``_MISSING``."""
    node = tree
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _unknown_key(key: str, known: dict) -> ConfigError:
    candidates = list(_known_paths(known))
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {path.rsplit(".", 1)[-1]: path for path in candidates}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    hint = f" (did you mean {close[0]!r}?)" if close else " (no similar key; check the defaults YAML)"
    return ConfigError(f"unknown config key {key!r}{hint}")


_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a mapping"}


def _kind(value: Any) -> type | None:
    for kind in (bool, int, float, str, list, dict):
        if isinstance(value, kind):
            return kind
    return None


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _check_type(key: str, default: Any, value: Any, source: str) -> None:
    """A value may replace a default of the same kind (an int may stand for a float; null for any)."""
    if default is None or value is None or _is_interpolation(default) or _is_interpolation(value):
        return
    want, got = _kind(default), _kind(value)
    if want is None or want == got or (want is float and got is int):
        return
    raise ConfigError(
        f"{source}: {key} must be {_TYPE_NAMES[want]} (the default is {default!r}), got {value!r}"
    )


def _parse_override(token: str) -> tuple[str, Any]:
    key = _split_override(token)
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([token]), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"override {token!r}: cannot parse the value ({_one_line(err)})") from None
    value: Any = parsed
    for part in key.split("."):
        value = value[part]
    return key, value


@dataclass(frozen=True)
class Compat:
    """How configs written for another codebase (the MemFlow release) load here.

    ``inert`` maps keys that are accepted but change nothing here to the value under which that holds
    (``...`` for any value): a layer that sets one has it named in a single warning, and a value other
    than that one is refused. ``adapt(values)`` rewrites a layer's plain values (a release format into
    ours) before they are checked against the known keys.
    """

    inert: Mapping[str, Any] = field(default_factory=dict)
    adapt: Callable[[dict], dict] | None = None


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    defaults_path: str | Path | None = None,
    compat: Compat | None = None,
) -> DictConfig:
    """The run config: ``defaults_path`` YAML (if any), then ``path`` YAML, then dot-list overrides.

    The first YAML loaded defines the known keys; every later key must exist there (unknown keys
    are rejected with the closest known one) and keep the default's kind (an integer stays an
    integer; null is always allowed). Entries of :data:`OPEN_MAPPINGS` are exempt from the first rule:
    their consumer checks them. Interpolations (``${...}``) are resolved when read. ``compat`` lets a
    release config load unchanged (see :class:`Compat`).
    """
    compat = compat or Compat()
    base = _load_yaml(path, "config file") if defaults_path is None else _load_yaml(defaults_path, "defaults")
    known = cast(dict, OmegaConf.to_container(base, resolve=False))
    layers = []
    if defaults_path is not None:
        layers.append((str(path), cast(dict, OmegaConf.to_container(_load_yaml(path, "config file"), resolve=False))))
    layers += [(f"override {token!r}", _override_layer(token)) for token in overrides]
    cfg, inert = base, []
    for source, values in layers:
        try:
            values = compat.adapt(values) if compat.adapt else values
            inert += _take_inert(values, compat.inert)
        except ConfigError as err:
            raise _prefixed(source, err) from None
        _check_tree(known, values, source, known)
        try:
            cfg = OmegaConf.merge(cfg, values)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {_one_line(err)}") from None
    if inert:
        log.warning("accepted for compatibility, no effect here: %s", ", ".join(dict.fromkeys(inert)))
    return cast(DictConfig, cfg)


def override_keys(overrides: Sequence[str]) -> frozenset[str]:
    """The dotted keys a list of ``key=value`` overrides sets (what the command line decided)."""
    return frozenset(_split_override(token) for token in overrides)


def _override_layer(token: str) -> dict:
    """``a.b=value`` as the nested layer ``{"a": {"b": value}}``."""
    key, value = _parse_override(token)
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _take_inert(values: dict, inert: Mapping[str, Any]) -> list[str]:
    """Remove the inert keys a layer sets; a value other than the harmless one is a ConfigError."""
    found = []
    for dotted, harmless in inert.items():
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        if harmless is not ... and value != harmless:
            raise ConfigError(
                f"{dotted}={value!r} is not supported here: this codebase always does what {dotted}={harmless!r} "
                f"does in the release; remove the key"
            )
        found.append(dotted)
    return found


def _in_open_mapping(dotted: str) -> bool:
    """Whether ``dotted`` names an entry inside one of :data:`OPEN_MAPPINGS`."""
    parts = dotted.split(".")
    return any(".".join(parts[:n]) in OPEN_MAPPINGS for n in range(1, len(parts)))


def _prefixed(source: str, err: ConfigError) -> ConfigError:
    return ConfigError(f"{source}: {err}")


def _check_tree(known: dict, values: dict, source: str, root: dict, prefix: str = "") -> None:
    """Every key of ``values`` must exist in ``known`` (recursively) with a value of the same kind."""
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            if _in_open_mapping(dotted):
                continue
            raise _prefixed(source, _unknown_key(dotted, root))
        default = known[key]
        if isinstance(default, dict) and isinstance(value, dict):
            _check_tree(default, value, source, root, dotted + ".")
        else:
            _check_type(dotted, default, value, source)


def to_container(cfg: DictConfig) -> dict:
    """A plain, resolved dict of the config (for sidecar files); bad interpolations are ConfigErrors."""
    try:
        return cast(dict, OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as err:
        raise ConfigError(f"config: {_one_line(err)}") from None


# --------------------------------------------------------------------------------------------
# Validators: each reads one dotted field and raises ConfigError naming it and the fix.


def get_field(cfg: DictConfig, key: str) -> Any:
    """The value at a dotted key; a missing key or a broken interpolation is a ConfigError."""
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key}: {_one_line(err)}") from None
    if value is _MISSING:
        raise ConfigError(f"{key} is not set; add it to the config YAML or pass {key}=VALUE")
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(cfg: DictConfig, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer field, optionally at least ``minimum`` and at most ``maximum``."""
    value = get_field(cfg, key)
    if not _is_int(value):
        raise ConfigError(f"{key} must be an integer, got {value!r}; set {key}=<integer>")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}; set {key}=<integer >= {minimum}>")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be <= {maximum}, got {value}; set {key}=<integer <= {maximum}>")
    return value


def require_positive_int(cfg: DictConfig, key: str) -> int:
    """An integer field that must be >= 1 (frame counts, sizes)."""
    return require_int(cfg, key, minimum=1)


def require_multiple_of(cfg: DictConfig, key: str, base: int, why: str = "") -> int:
    """A positive integer field that must be a multiple of ``base`` (``why`` names the reason)."""
    value = require_positive_int(cfg, key)
    if value % base:
        lower, upper = value - value % base, value - value % base + base
        reason = f" ({why})" if why else ""
        nearest = f"{lower} or {upper}" if lower else str(upper)
        raise ConfigError(f"{key}={value} must be a multiple of {base}{reason}; use e.g. {nearest}")
    return value


def require_number(cfg: DictConfig, key: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """A numeric field inside ``[minimum, maximum]`` (bounds optional)."""
    value = get_field(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ConfigError(f"{key}={value} is out of range; use a value in [{lo}, {hi}]")
    return float(value)


def require_choice(cfg: DictConfig, key: str, choices: Sequence[Any]) -> Any:
    """A field that must be one of ``choices``."""
    value = get_field(cfg, key)
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {options}")
    return value


def require_bool(cfg: DictConfig, key: str) -> bool:
    """A true/false field."""
    value = get_field(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def require_int_list(cfg: DictConfig, key: str) -> list[int]:
    """A list of integers (e.g. ``switch_frame_indices``)."""
    value = get_field(cfg, key)
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise ConfigError(f"{key} must be a list of integers like [40, 80], got {value!r}")
    return value


def require_existing_path(cfg: DictConfig, key: str, kind: str = "file") -> Path:
    """A path field that must name an existing ``kind`` ('file' or 'dir')."""
    value = get_field(cfg, key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a path, got {value!r}")
    path = Path(value)
    ok = path.is_file() if kind == "file" else path.is_dir()
    if not ok:
        noun = "file" if kind == "file" else "folder"
        raise ConfigError(f"{key}: {noun} {path} does not exist; set {key}=<path to an existing {noun}>")
    return path
