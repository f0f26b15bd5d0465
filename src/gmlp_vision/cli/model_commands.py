"""The commands that take a trained model: ``gmlp evaluate``, ``predict``, ``export`` and ``report``.

Also the CLI's argument types and the helpers these commands share with `main.py` (the accuracy lines, the CPU threads
for a device, the dataset a checkpoint was trained on).

Like `main.py`, this module only parses, calls the library and prints; errors propagate to `main.main`, which turns them
into one-line messages and exit codes. Library imports are inside the commands, so ``gmlp --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gmlp_vision.cli.common import add_tta, cpu_threads_for, device_flag, positive_int
from gmlp_vision.errors import ConfigError, printable

CHECK_IMAGES = 64  # random images the export check compares on


def checkpoint_dataset(ckpt: Any, args: argparse.Namespace, run_dir: Path) -> Any:
    """The dataset a checkpoint was trained on (``--dataset``/``--data`` override), checked against its model.

    The run's own data is tested on the files its start held out (``run_dir``'s ``holdout.json``), if any.
    """
    from gmlp_vision.data import load_dataset
    from gmlp_vision.data.layout import read_holdout

    cfg = ckpt.config
    if args.dataset is None and args.data is None and (in_memory := _in_memory_data(run_dir)):
        raise ConfigError(f"the run trained on {printable(in_memory)}: pass --dataset and --data for the test data")
    dataset = args.dataset or cfg.data.dataset
    data = args.data if args.data is not None else (cfg.data.data if dataset == cfg.data.dataset else None)
    options = cfg.load_options(download=args.download, progress=not args.quiet)
    if dataset == cfg.data.dataset and data == cfg.data.data:
        options["holdout_files"] = read_holdout(run_dir)
    ds = load_dataset(dataset, data, **options)
    if ds.num_classes != cfg.model.num_classes or ds.in_chans != cfg.model.in_chans:
        raise ConfigError(
            f"the checkpoint's model has {cfg.model.num_classes} classes and {cfg.model.in_chans} channels; "
            f"{dataset} has {ds.num_classes} and {ds.in_chans}"
        )
    return ds


def _in_memory_data(run_dir: Path) -> str | None:
    """What ``results.json`` says of data passed to train() in memory (no config names it), or None."""
    from gmlp_vision.errors import CheckpointError
    from gmlp_vision.untrusted import JSON_LIMIT, read_json_file

    try:
        results = read_json_file(run_dir / "results.json", JSON_LIMIT) if (run_dir / "results.json").is_file() else {}
    except CheckpointError:
        return None
    said = results.get("data") if isinstance(results, dict) else None
    return said if isinstance(said, str) else None


def split_name(split: str) -> str:
    """How the output's lines start for the evaluation split: ``Test``, ``Test (val/)``, ``Held-out test``."""
    from gmlp_vision.metrics import split_label

    label = split_label(split)
    return label[0].upper() + label[1:]


def print_accuracy(split: str, metrics: dict[str, float], top5: bool) -> None:
    """The accuracy lines of a split: top-1, and top-5 where it says something (``top5``)."""
    from gmlp_vision.metrics import accuracy_lines

    print("\n".join(accuracy_lines(split, metrics, top5)))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from gmlp_vision.checkpoint import load_checkpoint, resolve_checkpoint
    from gmlp_vision.evaluate import evaluate
    from gmlp_vision.metrics import shows_top5
    from gmlp_vision.runtime import resolve_device

    device = resolve_device(args.device)
    cpu_threads_for(device)
    if _names_an_export(args.checkpoint):
        model, ds, precision = _export_and_data(args, device)
    else:
        path = resolve_checkpoint(args.checkpoint)
        ckpt = load_checkpoint(path)
        ds, model, precision = (
            checkpoint_dataset(ckpt, args, path.parent),
            ckpt.build_model(device),
            ckpt.config.run.precision,
        )
    dataset = ds.name
    test = (ds.test.images, ds.test.labels)
    metrics = evaluate(model, *test, batch_size=args.batch_size, precision=precision, tta=args.tta)
    if args.json:
        print(
            json.dumps(
                {"checkpoint": str(args.checkpoint), "dataset": dataset, "images": len(ds.test.labels), "tta": args.tta}
                | metrics
            )
        )
    else:
        tta = "" if args.tta == "none" else f", test-time augmentation {args.tta}"
        print(f"{dataset} {ds.test_split} split, {len(ds.test.labels)} images{tta}: loss {metrics['loss']:.4f}")
        print_accuracy(split_name(ds.test_split), metrics, shows_top5(ds.num_classes))
    return 0


def _names_an_export(value: str) -> bool:
    """Whether ``gmlp evaluate``'s MODEL is a safetensors export: its folder, its weights file, or a Hub id."""
    from gmlp_vision.fetch import hub_id

    path = Path(value)
    return hub_id(value) is not None or path.suffix == ".safetensors" or (path / "model.safetensors").is_file()


def _export_and_data(args: argparse.Namespace, device: Any) -> tuple[Any, Any, str]:
    """An export's model (from its folder or the Hub), the data ``--dataset`` names, and the export's precision.

    Raises:
        ConfigError: no ``--dataset`` (an export does not record its data), or data of other classes.
    """
    from gmlp_vision.data import load_dataset
    from gmlp_vision.predict import Classifier

    classifier = Classifier.load(args.checkpoint, device)
    if not hasattr(classifier.model, "cfg"):
        raise ConfigError("gmlp evaluate takes a checkpoint, a run directory or a safetensors export, not ONNX")
    if args.dataset is None:
        raise ConfigError("an export does not record the data it was trained on: pass --dataset (and --data)")
    options = dict(download=args.download, progress=not args.quiet, image_size=classifier.image_size)
    options.update(resize=classifier.resize, crop_pct=classifier.crop_pct, channels=classifier.in_chans)
    ds = load_dataset(args.dataset, args.data, **options)
    if ds.classes != classifier.classes or ds.in_chans != classifier.in_chans:
        first = printable(", ".join(classifier.classes[:3])) + (", ..." if len(classifier.classes) > 3 else "")
        raise ConfigError(
            f"the export's model knows {len(classifier.classes)} classes ({first}) on {classifier.in_chans} channels; "
            f"{args.dataset} has {ds.num_classes} classes on {ds.in_chans} channels, or other names"
        )
    return classifier.model, ds, classifier.precision


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB"


def _write_card(ckpt_path: Path, out_dir: Path, ckpt: Any) -> None:
    from gmlp_vision.card import write_model_card

    card = write_model_card(ckpt_path, out_dir, loaded=ckpt)
    if card is None:
        print(f"kept {out_dir / 'README.md'}: not a card `gmlp export` wrote (no model card written)")
    else:
        print(f"wrote {card}: the model card")


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from gmlp_vision.checkpoint import load_checkpoint, resolve_checkpoint
    from gmlp_vision.fetch import check_push, push

    if args.quantize and args.format != "onnx":
        raise ConfigError("--quantize int8 applies to --format onnx only")
    if args.format == "triton":
        return _export_triton(args)
    if args.name is not None:
        raise ConfigError("--name applies to --format triton only")
    if args.push_to_hub:
        check_push(args.push_to_hub)  # before any work: the extra, the token, offline
    if args.check:
        cpu_threads_for(torch.device("cpu"))
    ckpt_path = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.build_model("cpu")
    mc = model.cfg
    images = torch.randint(
        0,
        256,
        (CHECK_IMAGES, mc.in_chans, mc.image_size, mc.image_size),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.uint8,
    )
    if args.format == "safetensors":
        folder = _export_safetensors(args, ckpt_path, ckpt, model, images)
        files = ["model.safetensors", "config.json"]
    else:
        out = _export_onnx(args, ckpt_path, model, images)
        folder, files = out.parent, [out.name, *([f"{out.stem}.int8.onnx"] if args.quantize else [])]
        _write_card(ckpt_path, folder, ckpt)
    if args.push_to_hub:  # the export's own files and its card, nothing else the folder holds
        files += ["README.md"] if (folder / "README.md").is_file() else []
        print(f"uploaded {', '.join(files)} to {push(folder, args.push_to_hub, files)}")
    return 0


def _export_triton(args: argparse.Namespace) -> int:
    """``--format triton``: a Triton model repository entry, its graph checked with ``--check``."""
    import gmlp_vision.export as export
    from gmlp_vision.checkpoint import load_model, resolve_checkpoint
    from gmlp_vision.files import made_folder, write_text
    from gmlp_vision.triton import model_name, repository_files

    if args.push_to_hub:
        raise ConfigError("--push-to-hub takes --format safetensors or onnx, not a Triton repository")
    ckpt_path = resolve_checkpoint(args.checkpoint)
    name = model_name(ckpt_path, args.name)
    model, ckpt = load_model(ckpt_path)
    repo = Path(args.out) if args.out else ckpt_path.parent / "triton"
    folder, data = repo / name, ckpt.config.data
    with made_folder(folder):  # a failed export leaves no folder made for it
        export.export_onnx(ckpt_path, folder / "1" / "model.onnx")
        for file, text in repository_files(name, model.cfg, ckpt.classes, data.resize, data.crop_pct).items():
            write_text(folder / file, text)
    print(f"wrote {folder}: config.pbtxt, 1/model.onnx, labels.txt, README.md (a Triton model repository: {repo})")
    if args.check:
        import torch

        mc = model.cfg
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (CHECK_IMAGES, mc.in_chans, mc.image_size, mc.image_size), generator=generator)
        diff = export.check_onnx(folder / "1" / "model.onnx", model, images.to(torch.uint8))
        print(f"check: onnxruntime vs PyTorch on {CHECK_IMAGES} random images: max abs logit difference {diff:.3g}")
    return 0


def _export_safetensors(args: argparse.Namespace, ckpt_path: Path, ckpt: Any, model: Any, images: Any) -> Path:
    """``--format safetensors``: the weights, config.json and the card, checked with ``--check``; returns the folder."""
    import torch

    import gmlp_vision.export as export
    from gmlp_vision.artifacts import load_safetensors

    out_dir = Path(args.out) if args.out else export.default_export_dir(ckpt_path)
    weights = export.export_safetensors(ckpt_path, out_dir)
    print(f"wrote {weights} ({_mb(weights)}) and {out_dir / 'config.json'}")
    _write_card(ckpt_path, out_dir, ckpt)
    if args.check:
        with torch.no_grad():
            diff = (load_safetensors(out_dir)(images.float()) - model(images.float())).abs().max().item()
        print(
            f"check: reloaded weights vs the checkpoint on {CHECK_IMAGES} random images: max abs logit "
            f"difference {diff:.3g}"
        )
        if diff != 0.0:
            raise export.ExportError(f"{weights} does not reproduce the checkpoint's logits exactly")
    return out_dir


def _export_onnx(args: argparse.Namespace, ckpt_path: Path, model: Any, images: Any) -> Path:
    """The ONNX graph (and ``--quantize int8``), checked with ``--check``; returns the graph's path."""
    import gmlp_vision.export as export

    mc = model.cfg
    out = Path(args.out) if args.out else export.default_export_dir(ckpt_path) / "model.onnx"
    export.export_onnx(ckpt_path, out, opset=args.opset)
    shape = f"(B, {mc.in_chans}, {mc.image_size}, {mc.image_size})"
    print(f"wrote {out} ({_mb(out)}): input 'pixels' float32 {shape} raw 0..255, output 'logits' (B, {mc.num_classes})")
    if args.check:
        diff = export.check_onnx(out, model, images)
        print(
            f"check: onnxruntime vs PyTorch on {CHECK_IMAGES} random images: max abs logit difference {diff:.3g} "
            "(limit 1e-4)"
        )
    if args.quantize:
        quantized = export.quantize_onnx(out, out.with_name(f"{out.stem}.int8.onnx"))
        print(f"wrote {quantized} ({_mb(quantized)}): int8 weights, dynamic activation quantisation, for CPU")
        if args.check:
            diff = export.check_onnx(quantized, model, images, atol=None)
            print(
                f"check: int8 vs PyTorch fp32: max abs logit difference {diff:.3g} (quantisation error, no limit; "
                "accuracy: benchmarks/bench_export.py)"
            )
    return out


def _cmd_report(args: argparse.Namespace) -> int:
    from gmlp_vision.checkpoint import load_checkpoint, resolve_checkpoint
    from gmlp_vision.config import load_config_file
    from gmlp_vision.metrics import shows_top5
    from gmlp_vision.report import plot_history
    from gmlp_vision.report_eval import evaluation_report
    from gmlp_vision.runtime import resolve_device

    run_dir = Path(args.run_dir)
    try:  # top-5 curves only where the run printed top-5: more than 10 classes
        classes = load_config_file(run_dir / "config.json").get("num_classes")
    except ConfigError:
        classes = None
    top5 = not isinstance(classes, int) or shows_top5(classes)
    written = plot_history(run_dir, top5=top5)
    for path in written:
        print(f"wrote {path}")
    if not args.evaluate:
        return 0
    path = resolve_checkpoint(run_dir)
    ckpt = load_checkpoint(path)
    ds = checkpoint_dataset(ckpt, args, path.parent)
    device = resolve_device(args.device)
    cpu_threads_for(device)
    model = ckpt.build_model(device)
    for path in evaluation_report(
        run_dir,
        model,
        ds.test.images,
        ds.test.labels,
        ckpt.classes,
        batch_size=args.batch_size,
        precision=ckpt.config.run.precision,
        split=ds.test_split,
    ):
        print(f"wrote {path}")
    return 0


def add_evaluate(sub: Any, dataset_names: Sequence[str]) -> None:
    """Add ``evaluate`` to the ``gmlp`` subparsers (listed after ``train``)."""
    p = sub.add_parser("evaluate", help="test top-1 and top-5 accuracy of a checkpoint")
    p.add_argument(
        "checkpoint",
        metavar="MODEL",
        help="checkpoint file (best.pt, last.pt), run directory, or a safetensors export (its folder, or its Hugging "
        "Face Hub id ORG/NAME) with --dataset",
    )
    _add_test_data_arguments(p, dataset_names)
    add_tta(p)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_evaluate)


def _add_test_data_arguments(p: argparse.ArgumentParser, dataset_names: Sequence[str]) -> None:
    """The flags of a command that runs a trained model on its test split: which data, from where, how fast."""
    p.add_argument("--dataset", choices=tuple(dataset_names), help="dataset (default: the one it was trained on)")
    p.add_argument("--data", help="local archive or folder (default: the training run's, or the cache)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True, help="download if missing")
    p.add_argument("--batch-size", type=positive_int, default=500, help="images per batch (default: 500)")
    p.add_argument("--device", type=device_flag, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no download progress bar")


def add_commands(sub: Any, dataset_names: Sequence[str]) -> None:
    """Add ``export`` and ``report`` to the ``gmlp`` subparsers."""
    p = sub.add_parser("export", help="export a trained model to ONNX (optionally int8), safetensors or Triton")
    p.add_argument("checkpoint", help="checkpoint file (best.pt, last.pt) or run directory")
    p.add_argument(
        "--format",
        choices=("onnx", "safetensors", "triton"),
        default="onnx",
        help="default: onnx; triton: a Triton model repository (REPO/NAME/config.pbtxt, 1/model.onnx, labels.txt)",
    )
    p.add_argument(
        "--out",
        help="ONNX file, safetensors folder or Triton repository (default: export/ beside the checkpoint; triton/)",
    )
    p.add_argument("--name", help="--format triton: the model's name in the repository (default: the run's)")
    p.add_argument("--quantize", choices=("int8",), help="also write MODEL.int8.onnx, dynamically quantised for CPU")
    p.add_argument("--check", action="store_true", help=f"compare with PyTorch on {CHECK_IMAGES} random images")
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default: 17)")
    p.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="then upload the export folder to this Hugging Face model repository (the hub extra and a token)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("report", help="draw a run's plots: training curves and test-set evaluation, in RUN_DIR/plots")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also classify the test split: confusion matrix, per-class accuracy, mistakes",
    )
    _add_test_data_arguments(p, dataset_names)
    p.set_defaults(func=_cmd_report)
