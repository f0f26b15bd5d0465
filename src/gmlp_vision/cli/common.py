"""What the commands share: argument types and the CPU threads of an inference command."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gmlp_vision.errors import ConfigError


def positive_int(text: str) -> int:
    """Argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def device_flag(text: str) -> str:
    """Argparse type: auto, cpu, cuda or cuda:N."""
    from gmlp_vision.config.checks import check_device  # the one rule, shared with the config and resolve_device

    try:
        return check_device(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None


def cpu_threads_for(device: Any) -> None:
    """Set torch's CPU threads for an inference command running on the CPU (`cpu.use_cpu_threads`, auto)."""
    if device.type != "cpu":
        return
    from gmlp_vision.cpu import use_cpu_threads

    choice = use_cpu_threads(0)
    if choice.warning:
        print(f"gmlp: warning: {choice.warning}", file=sys.stderr)  # stderr: stdout may be --json lines


TTA_CHOICES = ("none", "flip", "flip-shift")  # evaluate.TTA_MODES, without importing torch for --help


def add_tta(p: argparse.ArgumentParser) -> None:
    """``--tta``: test-time augmentation for the commands that run a trained model."""
    p.add_argument(
        "--tta",
        choices=TTA_CHOICES,
        default="none",
        help="test-time augmentation: the mean logits of each image and its mirror (flip), and of both moved 2 px "
        "up-left and down-right (flip-shift: 6 runs); for photos, not text or digits (default: none)",
    )
