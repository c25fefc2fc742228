"""The check of a command line from the cached description of the parser (dcssdae.parser_cache): it refuses exactly
what the full LightningCLI parser refuses, in its words, leaves to it what it cannot be sure of, prints the same help,
imports neither torch nor Lightning, and is never read for other code."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dcssdae import cli, parser_cache

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUICKSTART = ["--config", str(CONFIGS / "quickstart.yaml")]


class _Parsed(Exception):
    pass


def full_parse(argv: list[str]) -> tuple[str, str]:
    """("ok", "") when the full LightningCLI parser accepts `dcssdae ARGV` (nothing is built or run), else
    ("exit N", what it printed to stderr)."""
    cli_class = cli.make_cli_class()

    class ParseOnly(cli_class):
        def parse_arguments(self, parser, args):
            super().parse_arguments(parser, args)
            raise _Parsed

    err = io.StringIO()
    make = cli.make_cli_class
    cli.make_cli_class = lambda: ParseOnly
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.run_lightning_cli(argv)
    except _Parsed:
        return "ok", ""
    except SystemExit as stopped:
        return f"exit {stopped.code}", err.getvalue()
    finally:
        cli.make_cli_class = make
    return "ran", err.getvalue()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The description written by the full parser (its first command), in a cache folder of this module."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DCSSDAE_CACHE_DIR", str(folder))
        patch.setenv("DCSSDAE_PARSER_CACHE", "1")
        patch.setenv("DCSSDAE_NO_PREFLIGHT", "1")
        patch.setenv("COLUMNS", "100")
        assert full_parse(["fit", *QUICKSTART]) == ("ok", "")
        assert [p.name for p in folder.iterdir()] == [parser_cache.cache_file().name]
        yield folder


@pytest.fixture
def cached(cache_dir, monkeypatch):
    monkeypatch.setenv("DCSSDAE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("DCSSDAE_PARSER_CACHE", "1")
    monkeypatch.setenv("DCSSDAE_NO_PREFLIGHT", "1")
    monkeypatch.setenv("COLUMNS", "100")
    return cache_dir


def check(capsys, argv):
    status = parser_cache.check(argv)
    captured = capsys.readouterr()
    return status, captured.err, captured.out


# every shipped config, as its command runs it
SHIPPED = [["validate" if p.name == "bench_quality.yaml" else "fit", "--config", str(p)]
           for p in sorted(CONFIGS.rglob("*.yaml"))]


@pytest.mark.parametrize("argv", SHIPPED, ids=lambda a: Path(a[-1]).name)
def test_every_shipped_config_goes_on_to_the_full_parser(cached, capsys, argv):
    assert check(capsys, argv) == (None, "", "")


# accepted by the full parser (checked below), including settings whose type is a class this check does not rebuild
ACCEPTED = [
    ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"],
    ["--model.class_path", "dcssdae.distill.DistillSystem"],
    ["--model.loss_weights.eqm", "2"],
    ["--model.corruption.init_args.noise_power", "1.0"],
    ["--model.init_args.lr", "0.001"],
    ["--model.betas", "[0.9, 0.95]"],
    ["--data.batch_size", "4", "--seed_everything", "3", "--ema.decay", "0.99"],
    ["--trainer.max_time", "00:01:00:00", "--trainer.precision", "bf16-mixed", "--trainer.devices", "2"],
    ["--optimizer", "AdamW"],
    ["--checkpoint.every_n_train_steps", "100", "--ckpt_path", "last"],
]


@pytest.mark.parametrize("extra", ACCEPTED, ids=lambda a: a[0])
def test_what_the_full_parser_accepts_is_never_refused(cached, capsys, extra):
    argv = ["fit", *QUICKSTART, *extra]
    assert check(capsys, argv) == (None, "", "")
    assert full_parse(argv) == ("ok", "")


# refused by the full parser; this check reports each at once, in the same words
REFUSED = [
    ["--trainer.max_step", "20"],  # abbreviations are refused
    ["--trainer.max_step=20"],
    ["--model.lr", "fast"],
    ["--model.lrr", "1"],
    ["--data.batch_size", "x"],
    ["--trainer.precision", "17"],
    ["--emma.decay", "0.9"],
    ["--trainer.max_steps", "1.5"],
    ["--config", "missing.yaml"],
    ["stray"],
]


@pytest.mark.parametrize("extra", REFUSED, ids=lambda a: a[0])
def test_a_mistake_is_reported_in_the_words_of_the_full_parser(cached, capsys, extra, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", *QUICKSTART, *extra]
    status, err, _ = check(capsys, argv)
    assert status == 2
    assert full_parse(argv) == ("exit 2", err)


@pytest.mark.parametrize("argv", SHIPPED, ids=lambda a: Path(a[-1]).name)
def test_a_mistake_is_reported_with_every_shipped_config(cached, capsys, argv):
    """Including the configs that include others (the merge resolves the class_path of the model and of its
    corruption: their stand-ins are described too)."""
    argv = [*argv, "--trainer.max_stepz", "3"]
    status, err, _ = check(capsys, argv)
    assert status == 2
    assert full_parse(argv) == ("exit 2", err)


PHASE1 = ["--config", str(CONFIGS / "phase1.yaml")]


@pytest.mark.parametrize(("extra", "refused"), [
    (["--model.corruption.decay", "truncated"], False),
    (["--model.corruption", "FlowMatching", "--model.corruption.init_args.logit_std", "2"], False),
    (["--model.corruption.noise_power", "half"], True),
    (["--model.corruption.init_args.decay", "bogus"], True),
    (["--model.corruption.init_args.decayy", "1"], True),
], ids=lambda a: str(a))
def test_the_corruption_is_checked_like_the_model(cached, capsys, extra, refused):
    argv = ["fit", *PHASE1, *extra]
    status, err, _ = check(capsys, argv)
    assert status == (2 if refused else None)
    assert full_parse(argv) == (("exit 2", err) if refused else ("ok", ""))


def test_a_wrong_key_in_a_config_file_is_reported(cached, capsys, tmp_path):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  init_args:\n    lrr: 3\ntrainer:\n  max_step: 3\n")
    argv = ["fit", *QUICKSTART, "--config", str(wrong)]
    status, err, _ = check(capsys, argv)
    assert status == 2 and "did you mean" in err
    assert full_parse(argv) == ("exit 2", err)


@pytest.mark.parametrize("extra", [
    ["--trainer.logger.save_dir", "x"],  # an option of a class-typed setting: the full parser knows the class
    ["--print_config"],
    ["--model.help", "DCSSDAESystem"],
    ["--config", str(CONFIGS / "quickstart.yaml"), "--help"],  # the help after a config shows its values
], ids=lambda a: a[0])
def test_what_it_cannot_be_sure_of_is_left_to_the_full_parser(cached, capsys, extra):
    assert check(capsys, ["fit", *QUICKSTART, *extra]) == (None, "", "")


def test_a_model_class_from_another_module_is_left_to_the_full_parser_unimported(cached, capsys, tmp_path,
                                                                                 monkeypatch):
    (tmp_path / "user_models_probe.py").write_text("from dcssdae.system import DCSSDAESystem\n"
                                                   "class Mine(DCSSDAESystem):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import dcssdae.system

    real = sys.modules["dcssdae.system"]
    assert check(capsys, ["fit", *QUICKSTART, "--model.class_path", "user_models_probe.Mine"]) == (None, "", "")
    assert "user_models_probe" not in sys.modules  # not imported against the stand-in model classes
    assert sys.modules["dcssdae.system"] is real and dcssdae.system.DCSSDAESystem.__module__ == "dcssdae.system"


def test_help_is_the_full_parsers(tmp_path):
    """`dcssdae fit --help` as a new user runs it twice: the first run (the full parser) writes the description, the
    second prints the help from it; the same text. (In new processes: the help lists the subclasses of the classes
    it names that are imported, which depends on what ran before in a process.)"""
    env = {**os.environ, "DCSSDAE_CACHE_DIR": str(tmp_path), "DCSSDAE_PARSER_CACHE": "1", "COLUMNS": "100",
           "PYTHONPATH": str(ROOT)}
    code = ("import sys\nfrom dcssdae.cli import main\ntry:\n    code = main(['fit', '--help'])\n"
            "except SystemExit as stopped:\n    code = stopped.code\n"
            "sys.stderr.write(f'LIGHTNING {\"lightning\" in sys.modules} {code}')")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=300, check=False) for _ in range(2)]
    assert [r.stderr[-20:] for r in runs] == ["LIGHTNING True 0", "LIGHTNING False 0"], runs[0].stderr[-2000:]
    assert runs[1].stdout == runs[0].stdout and "--trainer.max_steps" in runs[0].stdout
    assert "model arguments" in runs[0].stdout
    assert len(list(tmp_path.glob("parser-*.json"))) == 1


def test_help_at_another_terminal_width_is_added_by_the_full_parser(cached, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "140")
    assert check(capsys, ["validate", "--help"]) == (None, "", "")
    assert full_parse(["validate", "--help"])[0] == "exit 0"
    capsys.readouterr()
    status, _, out = check(capsys, ["validate", "--help"])
    assert status == 0 and out.startswith("usage: dcssdae [options] validate")


def test_a_mistake_is_reported_without_importing_torch_or_lightning(cached):
    code = ("import sys\nfrom dcssdae.cli import main\n"
            f"code = main(['fit', '--config', {str(CONFIGS / 'quickstart.yaml')!r}, '--model.lr', 'fast'])\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'lightning', 'torchmetrics', 'torchvision')"
            " if m in sys.modules), code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "IMPORTED [] 2", (result.stdout, result.stderr[-2000:])
    assert result.stderr.startswith("dcssdae fit: error: --model.lr takes a float, got 'fast'"), result.stderr


def test_a_description_of_other_code_is_never_used(tmp_path):
    package = tmp_path / "dcssdae"
    shutil.copytree(Path(parser_cache.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = parser_cache.fingerprint(package)
    assert before == parser_cache.fingerprint()
    system = package / "system.py"
    system.write_text(system.read_text() + "\n# a change\n")
    assert parser_cache.fingerprint(package) != before
    assert parser_cache.cache_file().name == f"parser-{before}.json"  # the file is named by the code it describes


@pytest.mark.parametrize("text", ["", "{", "[]", "{}", "\x00\xff", "CLASS_LOOP"])
def test_a_damaged_description_leaves_the_command_line_to_the_full_parser(cached, capsys, text):
    path = parser_cache.cache_file()
    original = path.read_text()
    if text == "CLASS_LOOP":  # a base class that is not described
        description = json.loads(original)
        description["classes"]["dcssdae.distill.DistillSystem"]["base"] = "dcssdae.other.Gone"
        text = json.dumps(description)
    try:
        path.write_text(text)
        assert check(capsys, ["fit", *QUICKSTART, "--model.lr", "fast"]) == (None, "", "")
    finally:
        path.write_text(original)


def test_options_from_environment_variables_are_left_to_the_full_parser(cached, capsys, monkeypatch, tmp_path):
    """With JSONARGPARSE_DEFAULT_ENV, options come from variables named after each parser (PL_FIT__... for the full
    one): the check steps aside, and writes no description (its help would list the variables)."""
    monkeypatch.setenv("JSONARGPARSE_DEFAULT_ENV", "true")
    monkeypatch.setenv("PL_FIT__MODEL", "dcssdae.distill.DistillSystem")
    assert check(capsys, ["fit", "--model.teacher_steps", "3"]) == (None, "", "")
    monkeypatch.setenv("DCSSDAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(parser_cache, "describe_parser", lambda *a: {"subcommands": {}})
    parser_cache.write(None, {}, [], ["fit"])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delenv("JSONARGPARSE_DEFAULT_ENV")
    parser_cache.write(None, {}, [], ["fit"])
    assert [p.name for p in tmp_path.iterdir()] == [parser_cache.cache_file().name]


def test_a_valid_command_line_checked_first_leaves_nothing_behind(cached):
    """In a new process: the check of a valid command line puts the real model modules in place afterwards (none:
    not imported yet), then the full parser imports the real classes."""
    code = ("import sys\nfrom dcssdae import parser_cache\nfinders = list(sys.meta_path)\n"
            f"config = {str(CONFIGS / 'quickstart.yaml')!r}\n"
            "assert parser_cache.check(['fit', '--config', config, '--model.lr', 'fast']) == 2\n"  # (it parses)
            "assert parser_cache.check(['fit', '--config', config]) is None\n"
            "assert sys.meta_path == finders and 'torch' not in sys.modules\n"
            "assert not {'dcssdae.system', 'dcssdae.distill', 'dcssdae.objectives'} & set(sys.modules)\n"
            "import lightning.pytorch as pl\nfrom dcssdae.cli import model_classes\n"
            "assert all(issubclass(c, pl.LightningModule) for c in model_classes().values())\nprint('OK')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "OK", result.stderr[-2000:]


def test_the_cache_can_be_turned_off(cached, capsys, monkeypatch):
    monkeypatch.setenv("DCSSDAE_PARSER_CACHE", "0")
    assert parser_cache.cache_file() is None
    assert check(capsys, ["fit", *QUICKSTART, "--model.lr", "fast"]) == (None, "", "")


def test_only_the_newest_descriptions_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("DCSSDAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DCSSDAE_PARSER_CACHE", "1")
    for i in range(10):
        old = tmp_path / f"parser-{i:024d}.json"
        old.write_text("{}")
        os.utime(old, (i, i))
    monkeypatch.setattr(parser_cache, "describe_parser", lambda *a: {"subcommands": {}})
    parser_cache.write(None, {}, [], ["fit"])
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len(kept) == 8 and parser_cache.cache_file().name in kept and f"parser-{9:024d}.json" in kept
    assert json.loads(parser_cache.cache_file().read_text()) == {"subcommands": {}}


def test_types_are_described_as_json_and_rebuilt_the_same():
    import datetime
    import pathlib
    import typing

    class Model:
        pass

    for hint in (int, typing.Optional[int], typing.Union[str, pathlib.Path, None],  # noqa: UP007, UP045
                 typing.Literal["a", 1, None], list[int], dict[str, typing.Any], tuple[float, ...], int | None,  # noqa: PYI061
                 datetime.timedelta, typing.Optional[Model]):  # noqa: UP045
        encoded = parser_cache.encode_type(hint, {Model: "pkg.Model"})
        assert json.loads(json.dumps(encoded)) == encoded
        assert parser_cache.decode_type(encoded, {"pkg.Model": Model}) == hint
    for opaque in (object, typing.Union[int, object], list[object], typing.Literal[b"x"]):  # noqa: UP007
        with pytest.raises(parser_cache._Opaque):
            parser_cache.encode_type(opaque, {})


@pytest.mark.slow  # imports Lightning three times in new processes (~15 s)
def test_the_startup_benchmark_times_both_ways(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_startup", ROOT / "benchmarks" / "bench_startup.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--repeats", "1", "--commands", "fit --help", "--json", str(tmp_path / "startup.json")])
    assert json.loads((tmp_path / "startup.json").read_text()) == json.loads(json.dumps(result))
    (row,) = result["rows"]
    assert row["command"] == "dcssdae fit --help" and row["exit_code"] == 0 and row["same_exit_code"]
    assert row["cached_s"] > 0 and row["full_s"] > 0 and row["ratio"] > 0


@pytest.mark.parametrize("where", ["option", "model argument"])
def test_a_description_names_types_only_from_its_tables(cached, capsys, where):
    """A description is data: a type is looked up in fixed tables, never evaluated; a name outside them (here an
    attempt to run code) leaves the command line to the full parser."""
    code = "__import__('os').system('true')"
    path = parser_cache.cache_file()
    original = path.read_text()
    description = json.loads(original)
    if where == "option":
        action = next(a for a in description["subcommands"]["fit"]["actions"] if a.get("dest") == "trainer.max_steps")
        action["type"] = ["Union", code]
    else:
        description["classes"]["dcssdae.system.DCSSDAESystem"]["params"][0]["type"] = code
    try:
        path.write_text(json.dumps(description))
        assert check(capsys, ["fit", *QUICKSTART, "--model.lr", "fast"]) == (None, "", "")
    finally:
        path.write_text(original)


def test_an_argument_without_a_default_is_left_to_the_full_parser():
    import typing

    class Model:
        def __init__(self, required: int, lr: float = 0.1, anything: typing.Any = None, untyped=None):
            pass

    described = {p["name"]: (p["type"], p["default"]) for p in parser_cache.describe_class(Model, {})}
    assert described == {"required": (None, None), "lr": ("float", 0.1), "anything": ("Any", None),
                         "untyped": (None, None)}
