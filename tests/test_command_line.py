"""The `dcssdae` command line: what it refuses and how it says so (abbreviated options, values of the wrong type, a
missing or empty shard source: one line naming the option or the path), and that `dcssdae --help` answers without
importing torch or Lightning."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcssdae.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--config",
              str(ROOT / "tests" / "configs" / "cpu_tiny.yaml")]


def parse_error(capsys, argv: list[str]) -> str:
    """Run `dcssdae ARGV`, which must stop at argument parsing (exit 2); its first line."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err, err
    return err.splitlines()[0]


def test_abbreviated_options_are_refused_with_the_full_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = parse_error(capsys, ["fit", *QUICKSTART, "--trainer.max_step", "20"])
    assert line == ("dcssdae fit: error: unrecognized arguments: --trainer.max_step 20; did you mean "
                    "--trainer.max_steps?"), line
    line = parse_error(capsys, ["fit", *QUICKSTART, "--data.batch", "3"])
    assert "unrecognized arguments: --data.batch" in line, line
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--model.lr", "fast", "dcssdae fit: error: --model.lr takes a float, got 'fast'"),
    ("--model.init_args.warmup_steps", "ten", "dcssdae fit: error: --model.warmup_steps takes an int, got 'ten'"),
    ("--data.batch_size", "two", "dcssdae fit: error: --data.batch_size takes an int, got 'two'"),
    ("--model.optimizer", "sgd", ("dcssdae fit: error: --model.optimizer takes one of 'adamw', "
                                 "'radam_schedulefree', got 'sgd'")),
])
def test_a_value_of_the_wrong_type_names_the_option_and_its_type(capsys, option, value, expected):
    assert parse_error(capsys, ["fit", *QUICKSTART, option, value]) == expected


def test_help_answers_without_importing_torch_or_lightning():
    code = ("import sys\nfrom dcssdae.cli import main\ncode = main(['--help'])\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'lightning', 'jsonargparse', 'torchmetrics', 'diffusers', 'webdataset')\n"
            "          if m in sys.modules), code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: dcssdae {fit,validate,test,predict}"), result.stdout
    assert "dcssdae shards" in result.stdout and "dcssdae export" in result.stdout
    assert result.stdout.strip().endswith("IMPORTED [] 0"), result.stdout


def test_no_command_prints_the_usage_and_fails(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("usage: dcssdae")


def test_shards_from_a_missing_or_empty_folder_is_one_line(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    for source, says in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "is empty")):
        assert main(["shards", str(source), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dcssdae shards: error: source "), err
        assert f"{source} {says}" in err, err
        assert "image folder" in err and "parquet" in err, err
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_not_yaml_is_one_line_naming_the_file_and_the_place(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: [1\n")
    assert main(["fit", *QUICKSTART, "--config", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (f"dcssdae: error: config {broken}: not valid YAML (line 3, column 1): expected "
                                   "',' or ']', but got '<stream end>'"), err
    assert "Traceback" not in err
