"""The `dcssdae` command line before anything is built: config includes, and parse errors told in one line.

Pure Python (no torch, no Lightning): used by the LightningCLI (dcssdae.cli) and by the check of a command line from
the cached description of its parser (dcssdae.parser_cache).
"""

from __future__ import annotations

import re
from pathlib import Path

# ------------------------------------------------------------------------------------------------
# Config includes. jsonargparse itself reads a `config:` key inside a file, but a nested group given after it
# replaces the included group instead of merging into it; repeated --config (Lightning's documented way to compose
# configs) merges. So the include is expanded here into repeated --config arguments, parents first.


def expand_config_includes(args: list[str]) -> list[str]:
    """Replace every `--config FILE` (or `-c`, `--config=FILE`) whose YAML has a top-level `config:` key by the
    parent configs (recursively) followed by FILE's remaining settings (passed as a YAML string)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            out += _expand_config(args[i + 1], ())
            i += 2
        elif arg.startswith("--config="):
            out += _expand_config(arg.split("=", 1)[1], ())
            i += 1
        else:
            out.append(arg)
            i += 1
    return out


def _expand_config(value: str, chain: tuple[Path, ...]) -> list[str]:
    import yaml

    path = Path(value)
    if not path.is_file():
        return ["--config", value]  # a YAML string, or a missing file that the parser reports
    try:
        settings = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ValueError(f"config {path}: not valid YAML{where}: {problem}") from None
    if not isinstance(settings, dict) or "config" not in settings:
        return ["--config", value]
    if path.resolve() in chain:
        raise ValueError(f"config include cycle: {' -> '.join(map(str, chain + (path,)))}")
    parents = settings.pop("config")
    out = []
    for parent in [parents] if isinstance(parents, str) else list(parents):
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise FileNotFoundError(f"{path}: included config {parent!r} not found (looked for {parent_path})")
        out += _expand_config(str(parent_path), chain + (path.resolve(),))
    return out + ["--config", yaml.safe_dump(settings, sort_keys=False)] if settings else out


# ------------------------------------------------------------------------------------------------
# Parse errors: the error first, naming the option, with the closest known option name.


def innermost_reason(ex: BaseException | None) -> str:
    cause = ex
    while cause is not None and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    return str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""


def explain_error(message: str, ex: BaseException | None, parser,
                  model_names: list[str]) -> tuple[list[str], list[str], str]:
    """(lines, options, kind) of a jsonargparse parse error: the lines to print (the error, naming the option, with
    the closest known option name), and what it is: kind "type" (a value of the wrong type for `options`[0]),
    "unknown" (options that do not exist: `options`), "config" (a config file that cannot be read) or "other".

    jsonargparse's message for a bad key under `model.init_args` ends at "Problem with given class_path ...:"; the
    reason ("Option 'lrr' is not accepted") is the innermost cause, shown with the key it was found under.
    `model_names`: the model classes' arguments (in subclass mode the parser has no option per model argument)."""
    reason = innermost_reason(ex)
    command = getattr(ex, "subcommand_parser", None) or parser
    key = option_key(message, ex)
    wrong_type = re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", reason, re.DOTALL)
    if wrong_type and key:  # a value of the wrong type: name the option and what it takes
        lines = [f"--{key} takes {_type_words(wrong_type.group(1))}, got {wrong_type.group(2)!r}"]
    elif reason and not message.startswith(reason):
        lines = [reason + (f" (under {key})" if key else "")]
    else:
        lines = message.strip().splitlines() or ["invalid arguments"]
    unknown = unknown_options(message if not reason else f"{reason}\n{message}")
    guess = closest_option(unknown, command, model_names)
    if guess:
        lines[0] += f"; did you mean {guess}?"
    if wrong_type and key:
        return lines, [f"--{key}"], "type"
    if key == "config":
        return lines, ["--config"], "config"
    return lines, unknown, "unknown" if unknown else "other"


def option_key(message: str, ex: BaseException | None) -> str | None:
    """The dotted option a parse error is about (`model.lr`), from the `Parser key "..."` of the message and of
    each nested error (a model argument is a key under the key `model`); None if there is none."""
    keys = []
    texts = [message] + [str(e) for e in _error_chain(ex)]
    for text in texts:
        found = re.match(r'\s*Parser key "([^"]+)"', text)
        if found and (not keys or keys[-1] != found.group(1)):
            keys.append(found.group(1))
    key = ".".join(keys).replace(".init_args.", ".")
    return key or None


def _error_chain(ex: BaseException | None) -> list[BaseException]:
    chain = []
    while ex is not None and len(chain) < 50:
        chain.append(ex)
        ex = ex.__cause__ or ex.__context__
    return chain


def _type_words(expected: str) -> str:
    """jsonargparse's expected type in words: "<class 'float'>" -> "a float", "typing.Literal['a', 'b']" ->
    "one of 'a', 'b'"."""
    plain = re.fullmatch(r"<class '(?:builtins\.)?([\w.]+)'>", expected)
    if plain:
        name = plain.group(1)
        return ("an " if name[:1] in "aeiou" else "a ") + name
    literal = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", expected)
    if literal:
        return f"one of {literal.group(1)}"
    return expected


_UNKNOWN = (r"Option '([^']+)' is not accepted", r"accept option '([^']+)'", r"nrecognized arguments: (.+)")


def unknown_options(message: str) -> list[str]:
    """The options a parse error says do not exist, as `--group.name` (a name under a group, e.g. "lrr" under
    "model", as `--model.lrr`); [] when it says something else."""
    found = next((m for m in (re.search(p, message) for p in _UNKNOWN) if m), None)
    if found is None:
        return []
    if found.re.pattern == _UNKNOWN[2]:
        names = [a for a in found.group(1).split() if a.startswith("-")] or found.group(1).split()[:1]
    else:
        names = [found.group(1)]
        where = re.search(r'Parser key "([^"]+)"', message)
        if found.re.pattern == _UNKNOWN[0] and where:  # a name under a group, e.g. "lrr" under "model"
            names = [f"{where.group(1)}.{names[0]}"]
    return ["--" + n.lstrip("-").split("=", 1)[0].replace(".init_args.", ".") for n in names]


def closest_option(unknown: list[str], parser, model_names: list[str]) -> str | None:
    """The known option nearest to the first of `unknown` (unknown_options of a parse error; difflib), as
    `--group.name`, or None. Known: the parser's option strings and `--model.NAME` for each of `model_names`."""
    import difflib

    if not unknown:
        return None
    bad = unknown[0]
    known = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    known |= {f"--model.{name}" for name in model_names}
    match = difflib.get_close_matches(bad, sorted(known - {bad}), n=1, cutoff=0.6)
    return match[0] if match else None
