"""The `dcssdae` command.

`dcssdae fit|validate|test|predict ...` is a LightningCLI (see `run_lightning_cli`); the data and
export tools are plain sub-commands, each implemented by a `main(argv)` in its own module.
"""

from __future__ import annotations

import importlib
import sys

# sub-command -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int | None`.
TOOLS = {
    "shards": ("dcssdae.shards", "convert an image folder or HF imagenet-1k parquet files into WebDataset shards"),
    "photos": ("dcssdae.photos", "write the default real-photo shards (photos shipped in installed wheels)"),
    "export": ("dcssdae.export", "export EMA weights of a checkpoint to safetensors + config"),
    "reconstruct": ("dcssdae.export", "encode and decode image files, write the reconstructions"),
    "latent-stats": ("dcssdae.export", "measure the latent scaling factor on data and store it with an export"),
}


def run_lightning_cli(args: list[str] | None = None) -> None:
    """Run the LightningCLI (fit / validate / test / predict). Implemented in `dcssdae.system_cli`."""
    from dcssdae.system_cli import run

    run(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        tool_main = getattr(module, "main_" + argv[0].replace("-", "_"), None) or module.main
        return int(tool_main(argv[1:]) or 0)
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print("usage: dcssdae {fit,validate,test,predict} [--config CONFIG ...]  (LightningCLI; see dcssdae fit --help)")
        for name, (_, text) in TOOLS.items():
            print(f"       dcssdae {name:<13} {text}")
    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
