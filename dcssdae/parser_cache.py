"""Checking a command line before Lightning is imported, from a cached description of the `dcssdae` parser.

Importing Lightning takes about 5 s on 2 CPU cores (torch, then torchmetrics, which imports torchvision and
scipy.signal), so a mistyped option would be reported only after it. The full LightningCLI (dcssdae.cli) describes
its parser to a cache file the first time it runs after an install or a change of the code: every option with its
type and default, the arguments of the classes a config names by class_path (the models, the corruptions), the help
texts. Later commands rebuild an equivalent jsonargparse parser from the description (no torch, no Lightning) and
parse the command line with it first:

- `dcssdae fit --help` prints the cached help;
- an error this check is sure of (an option that does not exist, a value of the wrong type for an option of a plain
  type, a config file that cannot be read) is reported at once, in the words of the full parser;
- anything else (a valid command line, `--print_config`, a class chosen by class_path, an option of a class-typed
  setting such as trainer.logger) goes on to the full LightningCLI, which parses again and reports what this check
  left to it.

An option whose type names a class outside the standard library (a Lightning callback, a corruption, a dataclass) is
described as `Any`, so that the check does not refuse what the full parser accepts (tests/test_parser_cache.py
compares both on every shipped config and on overrides of every kind). When jsonargparse's environment settings change
how a command line is read (JSONARGPARSE_DEFAULT_ENV: options from environment variables, whose names differ between
the two parsers; JSONARGPARSE_DEBUG) the check steps aside. The cache file's name is a fingerprint of the package's
source and of the Python, jsonargparse, Lightning and torch versions, so a changed signature is never checked against
a stale description. `DCSSDAE_PARSER_CACHE=0` turns the check off; `DCSSDAE_CACHE_DIR` moves the cache (default:
`$XDG_CACHE_HOME/dcssdae`, else `~/.cache/dcssdae`).
"""

from __future__ import annotations

import collections.abc
import contextlib
import datetime
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import types
import typing
from pathlib import Path

SUBCOMMANDS = ("fit", "validate", "test", "predict")
FORMAT = 1  # of the cache file; part of the fingerprint

# ------------------------------------------------------------------------------------------------
# Where the description lives.


def fingerprint(root: Path | None = None) -> str:
    """A hash of everything the parser is built from: the package's source files (under `root`, default this
    package) and the versions of Python, jsonargparse, Lightning and torch (their signatures and type handling)."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256(f"{FORMAT} {sys.version}".encode())
    for package in ("jsonargparse", "lightning", "torch"):
        try:
            digest.update(f"{package} {version(package)}".encode())
        except PackageNotFoundError:
            digest.update(package.encode())
    root = Path(__file__).parent if root is None else root
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


def _environment_changes_parsing() -> bool:
    """Whether jsonargparse reads options from environment variables (named after each parser's prog, so not the
    same for the rebuilt parser) or raises instead of reporting."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("JSONARGPARSE_DEFAULT_ENV", "JSONARGPARSE_DEBUG"))


def cache_file() -> Path | None:
    """The description for this code and these versions (it may not exist yet); None when the check is off."""
    if os.environ.get("DCSSDAE_PARSER_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    folder = os.environ.get("DCSSDAE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dcssdae")
    return Path(folder) / f"parser-{_this_fingerprint()}.json"


@functools.cache
def _this_fingerprint() -> str:  # (read once per process: the check and the full parser both ask)
    return fingerprint()


# ------------------------------------------------------------------------------------------------
# Describing the full parser (called by the LightningCLI once it has built its parser).

# A type in a description is JSON: a name of _NAMED, a described class ("class:<class path>"), or
# [construct, argument, ...] with a construct of _CONSTRUCTS (Literal's arguments are the values themselves). Anything
# else is "not rebuilt" (None in the description, `Any` in the rebuilt parser).
_NAMED = {"int": int, "float": float, "bool": bool, "str": str, "bytes": bytes, "dict": dict, "list": list,
          "tuple": tuple, "set": set, "type": type, "NoneType": type(None), "Path": Path,
          "timedelta": datetime.timedelta, "Any": typing.Any, "...": Ellipsis}
_CONSTRUCTS = {"Union": typing.Union, "Literal": typing.Literal, "list": list, "dict": dict, "tuple": tuple,
               "set": set, "type": type, "Sequence": collections.abc.Sequence, "Mapping": collections.abc.Mapping,
               "Iterable": collections.abc.Iterable}


class _Opaque(Exception):
    """A type this check does not rebuild (it names a class outside the standard library)."""


def encode_type(hint, classes: dict[type, str]):
    """`hint` as JSON (see _NAMED, _CONSTRUCTS); `classes`: {described class: its class path}. Raises _Opaque for a
    type that names any other class."""
    try:
        if hint in classes:
            return f"class:{classes[hint]}"
    except TypeError:  # an unhashable hint
        raise _Opaque(hint) from None
    named = next((name for name, value in _NAMED.items() if hint is value), None)
    if named is not None:
        return named
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal and all(_json_value(a)[0] for a in args):
        return ["Literal", *args]
    if isinstance(hint, types.UnionType):
        origin = typing.Union
    construct = next((name for name, value in _CONSTRUCTS.items() if origin is value and name != "Literal"), None)
    if construct is None or not args:
        raise _Opaque(hint)
    return [construct, *(encode_type(a, classes) for a in args)]


def decode_type(encoded, classes: dict[str, type]):
    """The type `encoded` (encode_type's JSON) names; `classes`: {class path: class (a stand-in)}. A name that is
    not in the tables raises KeyError."""
    if isinstance(encoded, str):
        return classes[encoded[len("class:"):]] if encoded.startswith("class:") else _NAMED[encoded]
    name, *args = encoded
    if name != "Literal":
        args = [decode_type(a, classes) for a in args]
    return _CONSTRUCTS[name][tuple(args) if len(args) > 1 else args[0]]


def _class_refs(encoded) -> set[str]:
    """The class paths an encoded type names."""
    if isinstance(encoded, str):
        return {encoded[len("class:"):]} if encoded.startswith("class:") else set()
    return set().union(*(_class_refs(a) for a in encoded[1:])) if encoded[0] != "Literal" else set()


def _json_value(value) -> tuple[bool, object]:
    """(True, value) when `value` survives JSON unchanged (so the rebuilt parser gets the same default)."""
    try:
        back = json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return False, None
    return back == value and type(back) is type(value), back


def _describe(name: str, hint, default, classes: dict[type, str]) -> dict:
    """{name, type: encode_type's JSON or None (not rebuilt), default}: typed only with a default JSON keeps."""
    ok, default = _json_value(default)
    try:
        encoded = encode_type(hint, classes) if ok else None
    except _Opaque:
        encoded = None
    return {"name": name, "type": encoded, "default": default if encoded is not None else None}


def describe_class(cls, classes: dict[type, str]) -> list[dict]:
    """Every argument jsonargparse finds for `cls` (through **kwargs), described by _describe; one without a default
    is not rebuilt (the full parser says it is required)."""
    from jsonargparse._parameter_resolvers import get_signature_parameters

    params = {}
    for param in get_signature_parameters(cls, None, logger=False):
        if param.default is inspect.Parameter.empty:
            params.setdefault(param.name, {"name": param.name, "type": None, "default": None})
        else:
            params.setdefault(param.name, _describe(param.name, param.annotation, param.default, classes))
    return list(params.values())


def describe_parser(parser, described: dict[str, type], model_names: list[str]) -> dict:
    """A JSON-able description of the LightningCLI parser: per sub-command its options in order (typed ones with
    their type, or None, and default; group loaders) and help texts; the arguments of the `described` classes
    ({class path: class}: those a class_path may name, e.g. the models and their corruptions) and the names of the
    model arguments (for "did you mean")."""
    from jsonargparse import ActionConfigFile
    from jsonargparse._actions import _ActionConfigLoad
    from jsonargparse._typehints import ActionTypeHint

    classes = {cls: path for path, cls in described.items()}
    width = shutil.get_terminal_size().columns
    subcommands = {}
    for name, sub in parser._subcommands_action._name_parser_map.items():
        actions = []
        for action in sub._actions:
            if isinstance(action, ActionConfigFile):
                actions.append({"kind": "config", "options": action.option_strings})
            elif isinstance(action, _ActionConfigLoad):
                actions.append({"kind": "group", "dest": action.dest, "options": action.option_strings})
            elif isinstance(action, ActionTypeHint):
                option = _describe(action.dest, action._typehint, action.default, classes)
                actions.append({"kind": "typed", "dest": action.dest, "options": action.option_strings,
                                "type": option["type"], "default": option["default"]})
        subcommands[name] = {"actions": actions, "help": {str(width): sub.format_help()}}
    bases = {path: next((p for p, c in described.items() if c in cls.__mro__[1:]), None)
             for path, cls in described.items()}
    return {"subcommands": subcommands, "model_names": model_names,
            "classes": {path: {"base": bases[path], "params": describe_class(cls, classes)}
                        for path, cls in described.items()}}


def write(parser, described: dict[str, type], model_names: list[str], args: list[str]) -> None:
    """Describe the parser to the cache file unless it is there already; when `args` ask a sub-command's help at a
    terminal width the file has no help for, add it. Atomic; never fails the command."""
    try:
        path = cache_file()
        if path is None or _environment_changes_parsing():  # (its help would list the environment variables)
            return
        width, subcommand = str(shutil.get_terminal_size().columns), args[0] if args else None
        if not path.is_file():
            description = describe_parser(parser, described, model_names)
        elif subcommand in SUBCOMMANDS and any(a in ("-h", "--help") for a in args):
            description = json.loads(path.read_text())
            helps = description["subcommands"][subcommand]["help"]
            if width in helps:
                return
            helps[width] = parser._subcommands_action._name_parser_map[subcommand].format_help()
        else:
            return
        from dcssdae.atomic_files import atomic_file

        with atomic_file(path, "w") as f:  # (several processes of one run may write it at once)
            json.dump(description, f)
        for old in sorted(path.parent.glob("parser-*.json"), key=lambda p: p.stat().st_mtime)[:-8]:
            old.unlink(missing_ok=True)  # descriptions of earlier code (a few kept: several checkouts may share)
    except Exception:  # the cache only makes later commands start faster
        if os.environ.get("DCSSDAE_TRACEBACK"):
            raise


# ------------------------------------------------------------------------------------------------
# Checking a command line with the rebuilt parser.


class _Stop(Exception):
    """Raised by the rebuilt parser's error handler: parsing ends at the first error."""


# jsonargparse's own (optional) dependencies, which it may import while it parses
_ALLOWED_IMPORTS = {"jsonargparse", "yaml", "typing_extensions", "docstring_parser", "argcomplete", "_jsonnet",
                    "omegaconf", "ruyaml", "jsonschema", "fsspec", "requests", "validators", "reconplogger", "attr",
                    "attrs", "pydantic", "annotated_types", "typeshed_client", "importlib_metadata"}


class _NoOtherImports:
    """Import finder that refuses, while the rebuilt parser runs, every module outside the standard library and
    jsonargparse's dependencies: a class_path naming a user's module (which would import dcssdae.system, here a
    stand-in) is not imported against the stand-ins; the parser's error about it defers to the full LightningCLI."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in sys.stdlib_module_names | _ALLOWED_IMPORTS:
            return  # the usual finders import it
        raise ImportError(f"{name} is not imported while the command line is checked from the cached description")


def _stand_in(path: str, spec: dict, classes: dict[str, type]) -> type:
    """A class rebuilt from its described arguments (and its base, in `classes`): a class whose __init__ has
    their names, types and defaults (it is never called: the check builds nothing)."""
    module, _, name = path.rpartition(".")
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [inspect.Parameter(p["name"], inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p["default"],
                                annotation=typing.Any if p["type"] is None else decode_type(p["type"], classes))
              for p in spec["params"]]

    def __init__(self, *args, **kwargs):
        pass

    __init__.__signature__ = inspect.Signature([self, *params])
    __init__.__annotations__ = {p.name: p.annotation for p in params}
    base = classes[spec["base"]] if spec["base"] else object
    return type(name, (base,), {"__init__": __init__, "__module__": module, "__qualname__": name})


@contextlib.contextmanager
def _stand_ins(described: dict):
    """The described classes, rebuilt from their arguments, in place of their modules while the parser runs
    (the real modules, when imported, are put back after), with every other import refused. Yields {class path:
    stand-in}."""
    needs = {path: {spec["base"]} - {None} | set().union(*(_class_refs(p["type"]) for p in spec["params"] if p["type"]))
             for path, spec in described.items()}
    classes = {}
    while len(classes) < len(described):  # each after its base and the classes its arguments name
        ready = [path for path in described if path not in classes and needs[path] <= set(classes)]
        if not ready:
            raise ValueError(f"classes that need undescribed ones: {sorted(set(described) - set(classes))}")
        classes.update({path: _stand_in(path, described[path], classes) for path in ready})
    modules = {path.rpartition(".")[0]: types.ModuleType(path.rpartition(".")[0]) for path in classes}
    for path, cls in classes.items():
        setattr(modules[path.rpartition(".")[0]], cls.__name__, cls)
    saved = {name: sys.modules.get(name) for name in modules}
    finder = _NoOtherImports()
    sys.meta_path.insert(0, finder)
    sys.modules.update(modules)
    try:
        yield classes
    finally:
        sys.meta_path.remove(finder)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _build(description: dict, subcommand: str, classes: dict[str, type]):
    """A jsonargparse parser with the described options of `subcommand` (the others are not needed); `classes`: the
    described classes' stand-ins. Returns (parser, the sub-command's parser, the options not rebuilt)."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from jsonargparse._actions import _ActionConfigLoad

    top = ArgumentParser(prog="dcssdae", exit_on_error=False, allow_abbrev=False)
    top.add_argument("-c", "--config", action=ActionConfigFile)
    subcommands = top.add_subcommands(required=True, dest="subcommand")
    sub = ArgumentParser(prog=f"dcssdae {subcommand}", exit_on_error=False, allow_abbrev=False)
    for action in description["subcommands"][subcommand]["actions"]:
        if action["kind"] == "config":
            sub.add_argument(*action["options"], action=ActionConfigFile)
        elif action["kind"] == "group":
            sub.add_argument(*action["options"], action=_ActionConfigLoad)
        elif action["type"] is None:  # a class-typed setting: anything goes here, the full parser checks it
            sub.add_argument(*action["options"], type=typing.Any, default=action["default"])
        else:
            sub.add_argument(*action["options"], type=decode_type(action["type"], classes), default=action["default"])
    subcommands.add_subcommand(subcommand, sub)
    return top, sub, _not_rebuilt(description["subcommands"][subcommand]["actions"], description["classes"])


def _not_rebuilt(actions: list[dict], described: dict) -> list[str]:
    """The options typed `Any` in the rebuilt parser: the options and, below the options typed by described classes
    (or their described subclasses), the arguments not rebuilt, as dotted keys (`model.loss_weights`)."""
    found = []

    def below(prefix: str, encoded, seen: frozenset) -> None:
        named = _class_refs(encoded)
        for path in [p for p in described if p not in seen and (named & _ancestors(p, described))]:
            for param in described[path]["params"]:
                key = f"{prefix}.{param['name']}"
                if param["type"] is None:
                    found.append(key)
                else:
                    below(key, param["type"], seen | {path})

    for action in actions:
        if action["kind"] == "typed" and action["type"] is None:
            found.append(action["dest"])
        elif action["kind"] == "typed":
            below(action["dest"], action["type"], frozenset())
    return sorted(set(found))


def _ancestors(path: str, described: dict) -> set[str]:
    """A described class and its described bases."""
    found = set()
    while path and path not in found:
        found.add(path)
        path = described[path]["base"] if path in described else None
    return found


def check(argv: list[str]) -> int | None:
    """Check a LightningCLI command line from the cached description: the exit status when it is settled here (help
    printed: 0; an error reported: 2), None to go on to the full parser."""
    try:
        path = cache_file()
        if path is None or not argv or argv[0] not in SUBCOMMANDS or _environment_changes_parsing() or \
                not path.is_file():
            return None
        description = json.loads(path.read_text())
        from dcssdae.command_line import expand_config_includes

        argv = expand_config_includes(argv)
        subcommand, rest = argv[0], argv[1:]
        if any(a == "--print_config" or a.startswith("--print_config=") or re.fullmatch(r"--\S+\.help(=.*)?", a)
               for a in rest):
            return None
        if rest and rest[0] in ("-h", "--help"):
            help_text = description["subcommands"][subcommand]["help"].get(str(shutil.get_terminal_size().columns))
            if help_text is None:
                return None
            sys.stdout.write(help_text)
            return 0
        if any(a in ("-h", "--help") for a in rest):
            return None  # after a --config the help shows its values: the full parser's
        return _parse(description, argv)
    except Exception:  # whatever goes wrong here, the full parser still checks the command line
        if os.environ.get("DCSSDAE_TRACEBACK"):
            raise
        return None


def _parse(description: dict, argv: list[str]) -> int | None:
    """Parse with the rebuilt parser: 2 (and the error printed) when it refuses the command line for a reason it is
    sure of (kinds of dcssdae.command_line.explain_error: a value of the wrong type, a config file, an unknown option
    not under a class-typed setting), None otherwise."""
    import jsonargparse  # noqa: F401 - with its optional dependencies, before other imports are refused

    from dcssdae.command_line import explain_error

    refusal = None

    def error(message, ex=None):  # the parsers' error handler: keep the first error if it is a sure one, and stop
        nonlocal refusal
        lines, bad_keys, kind = explain_error(message, ex, sub, description["model_names"])
        if kind in ("type", "config") or (kind == "unknown" and not any(_under(key, opaque) for key in bad_keys)):
            refusal = lines
        raise _Stop(message)

    with _stand_ins(description["classes"]) as classes:
        top, sub, opaque = _build(description, argv[0], classes)
        top.error = sub.error = error
        with contextlib.suppress(_Stop):
            top.parse_args(argv)
    if refusal is None:
        return None
    prog = f"dcssdae {argv[0]}"
    sys.stderr.write(f"{prog}: error: " + "\n".join(refusal) + f"\n(`{prog} --help` lists every option)\n")
    return 2


def _under(key: str, prefixes: list[str]) -> bool:
    """Whether a dotted option is one of `prefixes` or below one (`trainer.logger.save_dir`, `trainer.callbacks+`)."""
    key = key.lstrip("-").replace(".init_args.", ".")
    return any(key == p or (key.startswith(p) and key[len(p)] in ".+=") for p in prefixes)
