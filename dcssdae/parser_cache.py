"""Checking a command line before Lightning is imported, from a cached description of the `dcssdae` parser.

Importing Lightning takes about 5 s on 2 CPU cores (torch, then torchmetrics, which imports torchvision and
scipy.signal), so a mistyped option would be reported only after it. The full LightningCLI (dcssdae.cli) describes its parser to a
cache file the first time it runs after an install or a change of the code: every option with its type and default,
the arguments of the model classes, the help texts. Later commands rebuild an equivalent jsonargparse parser from the
description (no torch, no Lightning) and parse the command line with it first:

- `dcssdae fit --help` prints the cached help;
- an error this check is sure of (an option that does not exist, a value of the wrong type for an option of a plain
  type, a config file that cannot be read) is reported at once, in the words of the full parser;
- anything else (a valid command line, `--print_config`, a class chosen by class_path, an option of a class-typed
  setting such as trainer.logger) goes on to the full LightningCLI, which parses again and reports what this check
  left to it.

An option whose type names a class outside the standard library (a Lightning callback, a corruption, a dataclass) is
described as `Any`: this check never refuses what the full parser accepts. The cache file's name is a fingerprint of
the package's source and of the Python, jsonargparse and Lightning versions, so a changed signature is never checked
against a stale description. `DCSSDAE_PARSER_CACHE=0` turns the check off; `DCSSDAE_CACHE_DIR` moves the cache
(default: `$XDG_CACHE_HOME/dcssdae`, else `~/.cache/dcssdae`).
"""

from __future__ import annotations

import ast
import collections.abc
import contextlib
import datetime
import hashlib
import inspect
import json
import linecache
import os
import pathlib
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


def cache_file() -> Path | None:
    """The description for this code and these versions (it may not exist yet); None when the check is off."""
    if os.environ.get("DCSSDAE_PARSER_CACHE", "1") in ("0", "false", "no"):
        return None
    folder = os.environ.get("DCSSDAE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dcssdae")
    return Path(folder) / f"parser-{fingerprint()}.json"


# ------------------------------------------------------------------------------------------------
# Describing the full parser (called by the LightningCLI once it has built its parser).

_BUILTINS = {int: "int", float: "float", bool: "bool", str: "str", bytes: "bytes", dict: "dict", list: "list",
             tuple: "tuple", set: "set", type(None): "NoneType", pathlib.Path: "pathlib.Path",
             datetime.timedelta: "datetime.timedelta", typing.Any: "typing.Any"}
_GENERICS = {list: "list", dict: "dict", tuple: "tuple", set: "set", collections.abc.Sequence: "collections.abc.Sequence",
             collections.abc.Mapping: "collections.abc.Mapping", collections.abc.Iterable: "collections.abc.Iterable",
             type: "type"}


class _Opaque(Exception):
    """A type this check does not rebuild (it names a class outside the standard library)."""


def type_source(hint, classes: dict[type, str]) -> str:
    """Python source for a type hint made of builtins, typing constructs and `classes` (name in the source);
    raises _Opaque for anything else."""
    try:
        if isinstance(hint, type) and hint in classes:
            return classes[hint]
        if hint in _BUILTINS:
            return _BUILTINS[hint]
    except TypeError:  # an unhashable hint
        raise _Opaque(hint) from None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return f"typing.Union[{', '.join(type_source(a, classes) for a in args)}]"
    if origin is typing.Literal:
        if not all(isinstance(a, (str, int, float, bool, type(None))) for a in args):
            raise _Opaque(hint)
        return f"typing.Literal[{', '.join(repr(a) for a in args)}]"
    if origin in _GENERICS and args:
        inner = ", ".join("..." if a is Ellipsis else type_source(a, classes) for a in args)
        return f"{_GENERICS[origin]}[{inner}]"
    raise _Opaque(hint)


def _literal(value) -> tuple[bool, object]:
    """(True, value) when `value` survives JSON unchanged (so the rebuilt parser gets the same default)."""
    try:
        back = json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return False, None
    return back == value and type(back) is type(value), back


def describe_class(cls, classes: dict[type, str]) -> list[dict]:
    """Every argument jsonargparse finds for `cls` (through **kwargs), as {name, type: source or None (Any),
    default: Python source}. An argument whose type or default cannot be rebuilt is described as `Any = None`."""
    from jsonargparse._parameter_resolvers import get_signature_parameters

    params = {}
    for param in get_signature_parameters(cls, None, logger=False):
        default = param.default
        try:
            ok = default is not inspect.Parameter.empty and ast.literal_eval(repr(default)) == default
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            ok = False
        try:
            hint = type_source(param.annotation, classes) if ok else None
        except _Opaque:
            hint = None
        params.setdefault(param.name, {"name": param.name, "type": hint,
                                       "default": repr(default) if hint is not None else "None"})
    return list(params.values())


def describe_parser(parser, model_classes: dict[str, type], model_names: list[str]) -> dict:
    """A JSON-able description of the LightningCLI parser: per sub-command its options in order (typed ones with
    their type source or None and default; group loaders), the model classes' arguments and the help texts."""
    from jsonargparse import ActionConfigFile
    from jsonargparse._actions import _ActionConfigLoad
    from jsonargparse._typehints import ActionTypeHint

    classes = {cls: path.rpartition(".")[2] for path, cls in model_classes.items()}
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
                ok, default = _literal(action.default)
                try:
                    hint = type_source(action._typehint, classes) if ok else None
                except _Opaque:
                    hint = None
                actions.append({"kind": "typed", "dest": action.dest, "options": action.option_strings,
                                "type": hint, "default": default if hint is not None else None})
        subcommands[name] = {"actions": actions, "help": {str(width): sub.format_help()}}
    bases = {path: next((p for p, c in model_classes.items() if c in cls.__mro__[1:]), None)
             for path, cls in model_classes.items()}
    return {"subcommands": subcommands, "model_names": model_names,
            "classes": {path: {"base": bases[path], "params": describe_class(cls, classes)}
                        for path, cls in model_classes.items()}}


def write(parser, model_classes: dict[str, type], model_names: list[str], args: list[str]) -> None:
    """Describe the parser to the cache file unless it is there already; when `args` ask a sub-command's help at a
    terminal width the file has no help for, add it. Atomic; never fails the command."""
    try:
        path = cache_file()
        if path is None:
            return
        width, subcommand = str(shutil.get_terminal_size().columns), args[0] if args else None
        if not path.is_file():
            description = describe_parser(parser, model_classes, model_names)
        elif subcommand in SUBCOMMANDS and any(a in ("-h", "--help") for a in args):
            description = json.loads(path.read_text())
            helps = description["subcommands"][subcommand]["help"]
            if width in helps:
                return
            helps[width] = parser._subcommands_action._name_parser_map[subcommand].format_help()
        else:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(description))
        os.replace(partial, path)
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


# A description is data: the types and defaults it holds are checked to be made only of these names, attribute
# and subscript access, tuples and constants before they are evaluated.
_TYPE_NAMES = {"typing": typing, "pathlib": pathlib, "datetime": datetime, "collections": collections,
               "NoneType": type(None), **{t.__name__: t for t in (int, float, bool, str, bytes, dict, list, tuple, set,
                                                                   type)}}


def _checked(source: str, names: set[str]) -> ast.Expression:
    """The expression `source` (a type, as type_source writes it), refused unless it is made of `names`, public
    attributes, subscripts, tuples and constants."""
    tree = ast.parse(source, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            ok = node.id in names
        elif isinstance(node, ast.Attribute):
            ok = not node.attr.startswith("_")
        else:
            ok = isinstance(node, (ast.Expression, ast.Subscript, ast.Tuple, ast.Constant, ast.Load))
        if not ok:
            raise ValueError(f"not a type of a parser description: {source!r}")
    return tree


def _type(source: str, namespace: dict):
    return eval(compile(_checked(source, set(namespace)), "<type>", "eval"), {"__builtins__": {}}, namespace)


def _class_source(path: str, spec: dict, class_names: set[str]) -> str:
    """Python source of a model class's stand-in: its described arguments, typed and with their defaults (each
    checked: names are identifiers, types made of known names, defaults literals)."""
    name, base = path.rpartition(".")[2], spec["base"]
    for param in spec["params"]:
        _checked(param["type"] or "typing.Any", set(_TYPE_NAMES) | class_names)
        ast.literal_eval(param["default"])
        if not param["name"].isidentifier():
            raise ValueError(f"not an argument name: {param['name']!r}")
    if not all(part.isidentifier() for part in f"{path}.{base or 'object'}".split(".")):
        raise ValueError(f"not a class path: {path!r}")
    lines = ["import typing, pathlib, datetime, collections.abc", "NoneType = type(None)"]
    if base:
        lines.append(f"from {base.rpartition('.')[0]} import {base.rpartition('.')[2]}")
    lines.append(f"class {name}({base.rpartition('.')[2] if base else 'object'}):")
    lines.append("    def __init__(self,")
    lines += [f"                 {p['name']}: {p['type'] or 'typing.Any'} = {p['default']}," for p in spec["params"]]
    lines.append("                 ): pass")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _stand_in_models(classes: dict):
    """The model classes, rebuilt from their described arguments, in place of their modules while the parser runs
    (the real modules, when imported, are put back after), with every other import refused."""
    order = []
    while len(order) < len(classes):  # base classes first
        order += [p for p, spec in classes.items() if p not in order and (spec["base"] in order or not spec["base"])]
    modules = {path.rpartition(".")[0] for path in classes}
    saved = {name: sys.modules.get(name) for name in modules}
    finder = _NoOtherImports()
    sys.meta_path.insert(0, finder)
    filenames = []
    try:
        for path in order:
            module = types.ModuleType(path.rpartition(".")[0])
            module.__file__ = f"<dcssdae: described arguments of {path}>"
            source = _class_source(path, classes[path], {p.rpartition(".")[2] for p in classes})
            linecache.cache[module.__file__] = (len(source), None, source.splitlines(True), module.__file__)
            filenames.append(module.__file__)  # (jsonargparse reads the source for the arguments' docs)
            sys.modules[module.__name__] = module
            exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - source built above
        yield
    finally:
        sys.meta_path.remove(finder)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for filename in filenames:
            linecache.cache.pop(filename, None)


def _build(description: dict, subcommand: str, error):
    """A jsonargparse parser with the described options of `subcommand` (the others are not needed)."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from jsonargparse._actions import _ActionConfigLoad

    namespace = dict(_TYPE_NAMES)
    for path in description["classes"]:
        module, _, name = path.rpartition(".")
        namespace[name] = getattr(sys.modules[module], name)
    top = ArgumentParser(prog="dcssdae", exit_on_error=False, allow_abbrev=False)
    top.add_argument("-c", "--config", action=ActionConfigFile)
    subcommands = top.add_subcommands(required=True, dest="subcommand")
    sub = ArgumentParser(prog=f"dcssdae {subcommand}", exit_on_error=False, allow_abbrev=False)
    opaque = []
    for action in description["subcommands"][subcommand]["actions"]:
        if action["kind"] == "config":
            sub.add_argument(*action["options"], action=ActionConfigFile)
        elif action["kind"] == "group":
            sub.add_argument(*action["options"], action=_ActionConfigLoad)
        elif action["type"] is None:  # a class-typed setting: anything goes here, the full parser checks it
            opaque.append(action["dest"])
            sub.add_argument(*action["options"], type=typing.Any, default=action["default"])
        else:
            hint = _type(action["type"], namespace)
            sub.add_argument(*action["options"], type=hint, default=action["default"])
    subcommands.add_subcommand(subcommand, sub)
    for path, spec in description["classes"].items():
        opaque += [f"model.{p['name']}" for p in spec["params"] if p["type"] is None]
    top.error = error
    sub.error = error
    return top, sub, sorted(set(opaque))


def check(argv: list[str]) -> int | None:
    """Check a LightningCLI command line from the cached description: the exit status when it is settled here (help
    printed: 0; an error reported: 2), None to go on to the full parser."""
    try:
        path = cache_file()
        if path is None or not argv or argv[0] not in SUBCOMMANDS or not path.is_file():
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
    sure of (kinds of dcssdae.command_line.explain_error: a value of the wrong type, a config file, an unknown option not
    under a class-typed setting), None otherwise."""
    import jsonargparse  # noqa: F401 - with its optional dependencies, before other imports are refused

    from dcssdae.command_line import explain_error

    reported = []

    def error(message, ex=None):
        lines, bad_keys, kind = explain_error(message, ex, sub, description["model_names"])
        if kind in ("type", "config") or (kind == "unknown" and not any(_under(key, opaque) for key in bad_keys)):
            reported.append(lines)
        raise _Stop(message)

    with _stand_in_models(description["classes"]):
        top, sub, opaque = _build(description, argv[0], error)
        try:
            top.parse_args(argv)
        except _Stop:
            pass
    if not reported:
        return None
    prog = f"dcssdae {argv[0]}"
    sys.stderr.write(f"{prog}: error: " + "\n".join(reported[0]) + f"\n(`{prog} --help` lists every option)\n")
    return 2


def _under(key: str, prefixes: list[str]) -> bool:
    """Whether a dotted option is one of `prefixes` or below one (`trainer.logger.save_dir`, `trainer.callbacks+`)."""
    key = key.lstrip("-").replace(".init_args.", ".")
    return any(key == p or (key.startswith(p) and key[len(p)] in ".+=") for p in prefixes)
