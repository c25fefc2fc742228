"""Start-up of the `dcssdae` command: seconds until it answers, with the cached check of the command line and with the
full LightningCLI parser, in one process, as ratios.

Each command runs as a new Python process (`python -m dcssdae.cli ...`), in interleaved rounds; the median of
--repeats runs is reported. "cached": the description of the parser is in the cache folder (a temporary one, written
by one full run first), so help and mistakes are answered before torch or Lightning is imported
(dcssdae.parser_cache). "full": `DCSSDAE_PARSER_CACHE=0`, the LightningCLI parser only. `ratio` = cached / full.
The commands: `dcssdae --help` (a control: answered before either parser), `fit --help`, two mistakes (one with the
GPU recipe's phase-1 config, which includes configs/base.yaml), and a valid command line (validate with a checkpoint
that does not exist: parsed, then stopped by the pre-flight check before anything is built), which the cached check
passes on to the full parser (its cost: ratio - 1). The reference is the import of Lightning alone
(`python -c "import lightning.pytorch"`).

    python benchmarks/bench_startup.py --repeats 5 --json docs/bench/startup_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dcssdae.atomic_files import write_json

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["--config", str(ROOT / "configs" / "quickstart.yaml")]
COMMANDS = {  # name -> arguments of `dcssdae`
    "help (control)": ["--help"],
    "fit --help": ["fit", "--help"],
    "wrong type": ["fit", *QUICKSTART, "--model.lr", "fast"],
    "abbreviation": ["fit", "--config", str(ROOT / "configs" / "phase1.yaml"), "--trainer.max_step", "20"],
    "valid": ["validate", *QUICKSTART, "--ckpt_path", "runs/missing/last.ckpt"],
}


def seconds(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False, timeout=300)
    return time.perf_counter() - start, done.returncode


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--commands", nargs="+", choices=list(COMMANDS), default=list(COMMANDS), help="which to time")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    dcssdae = [sys.executable, "-m", "dcssdae.cli"]
    with tempfile.TemporaryDirectory() as cache:
        base = {**os.environ, "DCSSDAE_CACHE_DIR": cache, "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
        modes = {"cached": {**base, "DCSSDAE_PARSER_CACHE": "1"}, "full": {**base, "DCSSDAE_PARSER_CACHE": "0"}}
        first, _ = seconds([*dcssdae, *COMMANDS["wrong type"]], modes["cached"])  # writes the description
        if not any(Path(cache).glob("parser-*.json")):
            raise SystemExit("the full parser wrote no description of itself: nothing to compare")
        commands = {name: COMMANDS[name] for name in args.commands}
        times = {(name, mode): [] for name in commands for mode in modes}
        codes = {}
        reference = []
        for _ in range(args.repeats):
            reference.append(seconds([sys.executable, "-c", "import lightning.pytorch"], base)[0])
            for name, command in commands.items():
                for mode, env in modes.items():
                    took, codes[name, mode] = seconds([*dcssdae, *command], env)
                    times[name, mode].append(took)
    rows = []
    for name, command in commands.items():
        cached, full = (statistics.median(times[name, mode]) for mode in modes)
        rows.append({"command": "dcssdae " + " ".join(a.replace(str(ROOT) + "/", "") for a in command),
                     "cached_s": round(cached, 3), "full_s": round(full, 3), "ratio": round(cached / full, 3),
                     "exit_code": codes[name, "cached"], "same_exit_code": codes[name, "cached"] == codes[name, "full"]})
        print(f"{rows[-1]['command']:<75} cached {cached:6.2f} s   full {full:6.2f} s   ratio {cached / full:.3f}")
    label = 'python -c "import lightning.pytorch"'
    print(f"{label:<75} {statistics.median(reference):6.2f} s")
    result = {
        "rows": rows,
        "import_lightning_s": round(statistics.median(reference), 3),
        "first_full_run_s": round(first, 3),
        "settings": {"repeats": args.repeats},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "commit": git_commit(),
        "command": "python benchmarks/bench_startup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
