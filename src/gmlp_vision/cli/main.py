"""The ``gmlp`` command: a thin shell over the library that prints for people and picks exit codes.

Exit codes: 0 success, 1 failure (bad data, bad checkpoint, I/O), 2 usage error (unknown flag or preset, impossible
config), 130 interrupted. Building the parser imports no torch (tests/test_cli.py checks it), so ``gmlp --help`` and
``gmlp train -h`` answer at once; each command imports what it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from gmlp_vision.cli.flags import DEFAULTS_NOTE, USAGE, add_config_arguments, config_from_args, explicit_values
from gmlp_vision.cli.model_commands import add_commands, add_evaluate
from gmlp_vision.cli.predict_command import add_predict
from gmlp_vision.cli.serve_command import add_serve
from gmlp_vision.console import drop_stdout, log_to_terminal, stdout_gone
from gmlp_vision.data import DATASET_KINDS, DATASETS
from gmlp_vision.errors import ConfigError, GmlpError, TrainingInterrupted, printable
from gmlp_vision.presets import DATASET_PRESET, PRESET_HELP, PRESETS
from gmlp_vision.version import __version__


def _cmd_train(args: argparse.Namespace) -> int:
    from gmlp_vision.reporting import default_callbacks
    from gmlp_vision.rundir import resume_config
    from gmlp_vision.runtime import launched
    from gmlp_vision.train import train

    if args.resume:
        if getattr(args, "preset", None) or getattr(args, "config", None):
            raise ConfigError("--resume takes the run's own config; --preset and --config cannot change it")
        cfg = resume_config(args.resume, explicit_values(args))
    else:
        from gmlp_vision.pretrained import weights_fit

        cfg = config_from_args(args, weights_fit)
    if args.print_config:
        from gmlp_vision.config import config_yaml

        print(config_yaml(cfg), end="")
        return 0
    try:
        train(cfg, resume=bool(args.resume), callbacks=default_callbacks(cfg), verbose=0)  # the log is set up here
    except TrainingInterrupted as e:
        if launched().main:
            print(f"gmlp: {e}", file=sys.stderr)
        return 128 + e.signum  # what shells expect: 130 for SIGINT, 143 for SIGTERM
    return 0  # the run said its results in the log (`metrics.result_lines`)


def _cmd_presets(args: argparse.Namespace) -> int:
    width = max(map(len, PRESETS)) + 1
    for name, values in PRESETS.items():
        print(f"{name:{width}s}{PRESET_HELP[name]}")
        if args.verbose:
            print(" " * width + " ".join(f"{k}={v}" for k, v in values.items()))
    default_for = ", ".join(f"{d} -> {p}" for d, p in DATASET_PRESET.items())
    print(f"\ndefault preset per --dataset: {default_for}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from gmlp_vision.checkpoint import load_checkpoint
    from gmlp_vision.cpu import cpu_threads
    from gmlp_vision.model import GMLP, count_parameters, flops_per_image

    if args.checkpoint:
        from gmlp_vision.checkpoint import resolve_checkpoint

        ckpt = load_checkpoint(resolve_checkpoint(args.checkpoint))
        model, source = ckpt.build_model(), f"checkpoint {args.checkpoint} (epoch {ckpt.epoch}, step {ckpt.step})"
    else:
        cfg = config_from_args(args)
        # The model the dataset's kind trains (a folder's classes are known only from its data: the config's then).
        kind = DATASET_KINDS[cfg.data.dataset]
        cfg = cfg.replace(
            num_classes=kind.num_classes or cfg.model.num_classes, in_chans=kind.in_chans or cfg.model.in_chans
        )
        model, source = GMLP(cfg.model), f"preset {cfg.preset} for {cfg.data.dataset}"
    mc = model.cfg
    print(f"gMLP from {source}")
    print(f"  input {mc.in_chans}x{mc.image_size}x{mc.image_size}, patch {mc.patch_size} -> {mc.num_patches} tokens")
    print(f"  width {mc.embed_dim}, hidden {mc.ffn_dim}, {mc.depth} blocks, {mc.num_classes} classes")
    print(f"  shortcut {mc.shortcut}, gelu {mc.gelu}, spatial init {mc.spatial_init}, final norm {mc.final_norm}")
    print(f"  patch init {mc.patch_init}, attention width {mc.attn_dim}")
    print(f"  dropout {mc.dropout}, head dropout {mc.head_dropout}, drop path {mc.drop_path}")
    print(f"\n  {'parameter':34s} {'shape':>14s} {'count':>10s}")
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and not name.startswith("blocks.0."):
            continue
        print(f"  {name:34s} {'x'.join(map(str, p.shape)):>14s} {p.numel():>10,d}")
    if mc.depth > 1:
        print(f"  (blocks 1..{mc.depth - 1} repeat block 0)")
    print(f"\n  trainable parameters: {count_parameters(model):,d}")
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if frozen:
        print(f"  frozen parameters: {frozen:,d} (the whitened patch embedding: --patch-init whiten)")
    print(f"  normalisation statistics (buffers): {2 * mc.in_chans}")
    print(f"  forward cost: {flops_per_image(mc) / 1e6:.2f} MFLOP per image (matrix products)")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"\ntorch {torch.__version__}, gmlp-vision {__version__}, CUDA device: {cuda}")
    threads = cpu_threads(getattr(args, "threads", 0))  # what `gmlp train` with these flags would run with, now
    print(
        f"{threads.describe()}\n  (torch's own default: {torch.get_num_threads()}; the machine: {os.cpu_count()} cores)"
    )
    if threads.warning:
        print(f"warning: {threads.warning}")
    return 0


def _config_command(sub: Any, name: str, help: str, optional: str) -> argparse.ArgumentParser:
    """A command that takes every config flag (train, info); its description says which defaults the help shows."""
    return sub.add_parser(name, help=help, usage=USAGE.replace("[-h]", f"[-h] [{optional}]"), description=DEFAULTS_NOTE)


def build_parser() -> argparse.ArgumentParser:
    """The ``gmlp`` parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="gmlp", description="Train, evaluate and inspect gMLP image classifiers.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"gmlp-vision {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _config_command(
        sub, "train", "train a model (default: the tutorial, seed preset on CIFAR-100)", "--resume RUN_DIR"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where its last.pt left it")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the full resolved config as YAML (for --config x.yaml) and exit without training",
    )
    add_config_arguments(p)
    p.set_defaults(func=_cmd_train)

    add_evaluate(sub, DATASETS)  # (model_commands.py)

    p = sub.add_parser("presets", help="list the presets")
    p.add_argument("-v", "--verbose", action="store_true", help="show every value each preset sets")
    p.set_defaults(func=_cmd_presets)

    p = _config_command(sub, "info", "model summary, parameter count, torch and device", "CHECKPOINT")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint (default: the model the flags describe)")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_info)

    add_predict(sub)  # (predict_command.py)
    add_commands(sub, DATASETS)  # export, report (model_commands.py)
    add_serve(sub)  # (serve_command.py)
    for name, command in sub.choices.items():
        command.allow_abbrev = False  # --epoc is not --epochs: a typo is an error, not a guess
        command.prog = f"gmlp {name}"
        command.set_defaults(command_parser=command)  # an unknown flag is reported with this command's usage
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code.

    A command whose standard output is closed early (``| head``) stops there and exits 0, quietly, as Unix tools do.
    """
    try:
        return _main(argv)
    except BrokenPipeError as e:
        if stdout_gone():
            drop_stdout()
            return 0
        print(f"gmlp: error: {printable(e)}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # argparse: 0 for --help/--version, 2 for usage errors (it already printed why)
        return int(e.code or 0)
    from gmlp_vision.runtime import launched

    rank = launched().rank  # under torchrun only rank 0 logs; every rank reports its own errors
    log_to_terminal(logging.INFO if rank == 0 else logging.WARNING)
    prog = "gmlp" if rank == 0 else f"gmlp [rank {rank}]"
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"{prog}: error: {printable(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # `main` tells a closed standard output from any other pipe
    except (GmlpError, OSError) as e:  # messages quote names from files and folders: shown terminal-safe
        print(f"{prog}: error: {printable(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gmlp: interrupted", file=sys.stderr)
        return 130
