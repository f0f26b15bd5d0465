"""The ``README.md`` model card ``gmlp export`` writes beside what it exports.

A Hugging Face-style card (YAML header, then Markdown): the files, the data, the results with the command that
produced them, the training settings and the whole config, the classes, how to use the model, and its intended use
and limits. The results are the final evaluation ``results.json`` recorded for this very checkpoint (the run's final
weights, or ``ema.pt``'s weight average); for any other checkpoint the card gives the validation metrics the
checkpoint itself stores, and says so.

The card ends with `MARKER`. A ``README.md`` without it (the user's own, or a card whose marker the user deleted to
keep their edits) is never overwritten.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gmlp_vision.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from gmlp_vision.errors import CheckpointError, ExportError, printable
from gmlp_vision.files import why_not_written, write_text
from gmlp_vision.metrics import shows_top5
from gmlp_vision.timm_layout import timm_architecture
from gmlp_vision.untrusted import JSON_LIMIT, read_json_file
from gmlp_vision.version import __version__

MARKER = "<!-- gmlp-vision model card: `gmlp export` rewrites this file; delete this line to keep your edits. -->"
HUB_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100"}  # our dataset names -> their Hub dataset ids
FILES = {
    "model.safetensors": "the weights (`gmlp export --format safetensors`): under timm's names where timm builds the "
    "model (its input normalisation is in `config.json`), else under gmlp-vision's with the normalisation",
    "config.json": "architecture and preprocessing in timm's Hub layout (`pretrained_cfg`), read by gmlp-vision",
    "model.onnx": "ONNX graph, fp32, input `pixels` (B, C, S, S) raw 0..255, output `logits` (`gmlp export`)",
    "model.int8.onnx": "the ONNX graph with int8 weights, for CPU inference (`gmlp export --quantize int8`)",
}


def _pct(value: Any) -> str:
    return f"{100 * value:.2f} %" if isinstance(value, (int, float)) else "-"


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _count(counts: dict[str, Any], key: str) -> str:
    value = counts.get(key)
    return f"{value:,}" if isinstance(value, int) else "?"


def _code(text: object, *, table: bool = False) -> str:
    """``text`` as an inline code span that shows it literally, whatever it holds (a class or file name is data).

    Inside a code span Markdown and HTML are not interpreted (``<script>``, ``*``, ``[``); control characters and
    newlines, which could end the span or start a block, become escapes (`errors.printable`); the span is delimited by
    one backtick more than the longest run inside it; and in a table (``table``) a ``|``, which GFM reads as the end
    of the cell even inside a span, is escaped.
    """
    body = printable(text)
    if table:
        body = body.replace("|", "\\|")
    fence = _fence(body, 1)
    pad = " " if body.startswith("`") or body.endswith("`") or not body.strip() else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def _code_block(language: str, text: str) -> list[str]:
    """The lines of a fenced code block holding ``text`` as it is: its fence is longer than any backtick run inside."""
    fence = _fence(text, 3)
    return [fence + language, text, fence]


def _fence(text: str, shortest: int) -> str:
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    return "`" * max(shortest, longest + 1)


def _read_results(run_dir: Path) -> dict[str, Any]:
    try:
        results = read_json_file(run_dir / "results.json", JSON_LIMIT)
    except CheckpointError:  # missing, not a regular file, too large, not JSON: a card without the final results
        return {}
    return results if isinstance(results, dict) else {}


def _text(results: dict[str, Any], key: str, default: str) -> str:
    value = results.get(key, default)
    return value if isinstance(value, str) else default


def _whole(value: Any) -> str:
    return str(value) if type(value) is int else "?"


def _final_metrics(ckpt_path: Path, results: dict[str, Any]) -> dict[str, Any] | None:
    """The final evaluation results.json holds for this checkpoint file, if it holds one."""
    if ckpt_path.name == "ema.pt":
        found = results.get("test_ema")
    else:  # "test" was measured on test_checkpoint (before 0.3: on the final checkpoint, which it then was)
        measured = results.get("test_checkpoint", results.get("final_checkpoint"))
        found = results.get("test") if measured == ckpt_path.name else None
    return found if isinstance(found, dict) else None


def _yaml_text(text: str) -> str:
    """``text`` as a YAML scalar: a JSON string (which YAML reads as it is), terminal-safe, non-ASCII kept."""
    return json.dumps(printable(text), ensure_ascii=False)


def _header(ckpt_path: Path, ckpt: Checkpoint, files: list[str], results: dict[str, Any]) -> str:
    """Hugging Face's metadata block: library, task, tags, licence, datasets, metrics and the ``model-index``.

    Every free text (the run's name, a folder's name) is written as a JSON string, which YAML reads as it is.
    """
    lines = ["---", "library_name: gmlp-vision", "pipeline_tag: image-classification", "tags:"]
    lines += ["- image-classification", "- gmlp", "- gmlp-vision"]
    if isinstance(timm_architecture(ckpt.config.model), tuple) and "model.safetensors" in files:
        lines.append("- timm")  # timm builds it from these files
    lines.append("license: other  # the weights carry the training data's terms: set its licence before sharing")
    hub, data_name = _data_ids(ckpt, results)
    if hub is not None:
        lines += ["datasets:", f"- {hub}"]
    lines += ["metrics:", "- accuracy"]
    metrics = _final_metrics(ckpt_path, results)
    acc = metrics.get("acc") if metrics is not None else None
    if type(acc) is float and 0.0 <= acc <= 1.0:  # a finite share: anything else leaves the index out
        split = _yaml_text(_text(results, "test_split", "test"))
        name = _yaml_text(ckpt_path.parent.name or "gmlp")
        lines += [
            "model-index:",
            f"- name: {name}",
            "  results:",
            "  - task:",
            "      type: image-classification",
            "      name: Image Classification",
            "    dataset:",
            f"      type: {json.dumps(hub or 'imagefolder')}",
            f"      name: {_yaml_text(data_name)}",
            f"      split: {split}",
            "    metrics:",
            "    - type: accuracy",
            f"      value: {round(100 * acc, 2)}",
            "      name: Top-1 accuracy",
        ]
    lines.append("---")
    return "\n".join(lines)


def _data_ids(ckpt: Checkpoint, results: dict[str, Any]) -> tuple[str | None, str]:
    """The data's Hugging Face Hub dataset id (CIFAR's) or None, and its name.

    The name is a folder's or table's file name, the kind, or for data passed to train() in memory what results.json
    says of it (``results["data"]``).
    """
    data = ckpt.config.data
    if isinstance(results.get("data"), str):
        return None, results["data"]
    if data.dataset in ("folder", "csv") and data.data:
        return None, Path(data.data).name
    return HUB_DATASETS.get(data.dataset), data.dataset


def _data_name(ckpt: Checkpoint, results: dict[str, Any]) -> str:
    name = _data_ids(ckpt, results)[1]
    if isinstance(results.get("data"), str):
        return printable(name)
    what = {"folder": "the image folder ", "csv": "the label table "}.get(ckpt.config.data.dataset, "")
    return what + _code(name)


def _data_section(ckpt: Checkpoint, results: dict[str, Any]) -> list[str]:
    mc, data = ckpt.config.model, ckpt.config.data
    lines = ["## Data", "", f"- Trained on {_data_name(ckpt, results)}."]
    counts = results.get("images")
    if isinstance(counts, dict):
        split = _text(results, "test_split", "test")
        lines.append(
            f"- Images: {_count(counts, 'train')} for training, {_count(counts, 'validation')} held out for "
            f"validation, {_count(counts, 'test')} in the {_code(split)} split for the final evaluation."
        )
    side, square = int(mc.image_size / data.crop_pct), f"{mc.image_size} x {mc.image_size}"
    pct = f" (crop_pct {data.crop_pct:g})" if data.crop_pct != 1.0 else ""
    if data.resize == "crop":
        fit = f"get their shorter side resized to {side} px{pct}, then the centre {square} is cut out"
    else:
        fit = f"are squashed to {side} x {side}" + (f"{pct}, then the centre {square} is cut out" if pct else "")
    kind = "RGB" if mc.in_chans == 3 else ("grayscale" if mc.in_chans == 1 else f"{mc.in_chans}-channel")
    lines.append(
        f"- Input: {kind} images of {square} pixels, used whole; images of another size {fit} (bilinear, antialiased)."
    )
    lines.append("- Pixels go in raw (0..255); the model normalises them with the training images' statistics.")
    return lines


def _results_section(ckpt_path: Path, ckpt: Checkpoint, results: dict[str, Any], top5: bool) -> list[str]:
    lines = ["## Results", ""]
    final = _final_metrics(ckpt_path, results)
    if final is not None:
        split = _text(results, "test_split", "test")
        name = _code(ckpt_path.name, table=True)
        weights = "weight average (`ema.pt`)" if ckpt_path.name == "ema.pt" else f"final weights ({name})"
        lines += ["| split | weights | top-1 | " + ("top-5 | " if top5 else "") + "loss |"]
        lines += ["|---|---|---|" + ("---|" if top5 else "") + "---|"]
        row = f"| {_code(split, table=True)} | {weights} | {_pct(final.get('acc'))} | "
        lines += [row + (f"{_pct(final.get('top5'))} | " if top5 else "") + f"{_loss(final.get('loss'))} |", ""]
        epochs, best = _whole(results.get("epochs_run")), _whole(results.get("best_epoch"))
        stopped = ", stopped early" if results.get("stopped_early") else ""
        lines.append(f"Trained for {epochs} epochs (best validation epoch {best}{stopped}).")
    else:
        m = ckpt.metrics
        lines.append(
            f"No final evaluation is recorded for {_code(ckpt_path.name)} (the run did not finish, or results.json "
            f"describes another checkpoint). At epoch {ckpt.epoch} (step {ckpt.step}) it recorded validation top-1 "
            f"{_pct(m.get('val_acc'))}, loss {_loss(m.get('val_loss'))}; training top-1 {_pct(m.get('acc'))}."
        )
    command = results.get("command")
    if isinstance(command, str):
        lines += ["", "Produced by:", "", *_code_block("bash", printable(command))]
    lines += ["", "`gmlp evaluate RUN_DIR` evaluates the run's final weights again."]
    return lines


def _schedule(cfg: Any) -> str:
    o = cfg.optim
    parts = [o.schedule + (f" to {o.min_lr:g}" if o.schedule != "constant" else "")]
    if o.warmup_epochs:
        parts.append(f"{o.warmup_epochs:g} warm-up epochs")
    if o.plateau_patience:
        parts.append(f"lr x{o.plateau_factor:g} after {o.plateau_patience} epochs without improvement")
    if o.early_stop_patience:
        parts.append(f"early stopping after {o.early_stop_patience}")
    if o.ema:
        parts.append(f"weight average {o.ema:g}")
    return ", ".join(parts)


def _training_section(ckpt: Checkpoint) -> list[str]:
    cfg = ckpt.config
    o, a, m = cfg.optim, cfg.augment, cfg.model
    augment = [
        f"crop {a.crop}" if a.crop != "none" else "",
        ("flip" if a.flip_mode == "random" else "alternating flip") if a.flip else "",
    ]
    augment += [f"zoom {a.zoom:g}" if a.zoom else ""]
    augment += [f"{a.policy} {a.policy_ops}/{a.policy_magnitude:g}" if a.policy != "none" else ""]
    augment += [f"mixup {a.mixup:g}" if a.mixup else "", f"cutmix {a.cutmix:g}" if a.cutmix else ""]
    augment += [f"random erasing {a.erase:g}" if a.erase else ""]
    settings = [
        ("preset", _code(cfg.preset, table=True)),
        ("model", f"{m.depth} blocks, width {m.embed_dim} / {m.ffn_dim}, patch {m.patch_size}"),
        ("epochs, batch", f"{o.epochs}, {o.batch_size}"),
        ("optimizer", f"{o.optimizer}, lr {o.lr:g}, weight decay {o.weight_decay:g}"),
        ("schedule", _schedule(cfg)),
        ("regularisation", f"dropout {m.dropout:g}, drop path {m.drop_path:g}, label smoothing {o.label_smoothing:g}"),
        ("augmentation", ", ".join(x for x in augment if x) or "none"),
        ("precision", cfg.run.precision),
    ]
    if o.class_weights != "none" or cfg.data.sampler != "shuffle":
        settings.append(("class balance", f"class weights {o.class_weights}, sampler {cfg.data.sampler}"))
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings]
    shared = cfg.to_dict()  # without the local paths of the data and the run
    shared["data"]["data"] = Path(cfg.data.data).name if cfg.data.data else None
    shared["run"]["out"] = None
    config = json.dumps(shared, indent=2)  # ASCII: every control and non-ASCII character escaped
    lines += ["", "<details><summary>The whole configuration</summary>", "", *_code_block("json", config), ""]
    lines.append("</details>")
    return lines


def _usage_section(ckpt: Checkpoint, files: list[str]) -> list[str]:
    graph = next((f for f in files if f.endswith(".onnx")), None)
    load = f"  # or THIS_FOLDER/{printable(graph)}, run by onnxruntime" if graph else ""
    code = f'from gmlp_vision import Classifier\n\nclassifier = Classifier.load("THIS_FOLDER"){load}\n'
    code += 'print(classifier.predict(["photo.jpg"], top_k=3))'
    lines = [
        "## How to use",
        "",
        "gmlp-vision is installed from its source (it is not on PyPI); in a checkout of it:",
        "",
        "```bash",
        "pip install '.[hub]'",
        "gmlp predict THIS_FOLDER photo.jpg          # or its Hub id ORG/NAME; top-5 classes with probabilities",
        "```",
        "",
        *_code_block("python", code),  # the file name could hold backticks
        "",
    ]
    return lines + _timm_lines(ckpt, files)


def _timm_lines(ckpt: Checkpoint, files: list[str]) -> list[str]:
    """How timm loads the weights, for a model it builds; else that it does not, and why."""
    mc = ckpt.config.model
    timm = timm_architecture(mc)
    plain = (
        f"Without gmlp-vision: fit the image to {mc.image_size} x {mc.image_size} as described under Data, and feed "
        f"float32 pixels 0..255 shaped (B, {mc.in_chans}, {mc.image_size}, {mc.image_size}); softmax the logits."
    )
    if not isinstance(timm, tuple):
        return [plain, "", f"timm cannot build this model: {timm}. The weights carry gmlp-vision's names."]
    if "model.safetensors" not in files:
        return [plain]
    code = (
        "import json, timm\n\n"
        'cfg = json.load(open("THIS_FOLDER/config.json"))\n'
        'model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],\n'
        '                          pretrained_cfg_overlay=dict(file="THIS_FOLDER/model.safetensors",\n'
        '                                                      num_classes=cfg["num_classes"]),\n'
        '                          **cfg["model_args"])  # or timm.create_model("hf-hub:ORG/NAME", pretrained=True)\n'
        "# input: pixels / 255, normalised with pretrained_cfg's mean and std, at its input_size"
    )
    return [f"In timm this is `{timm[0]}` with the weights under timm's names:", "", *_code_block("python", code)]


def _limits_section(ckpt: Checkpoint) -> list[str]:
    n, size = len(ckpt.classes), ckpt.config.model.image_size
    return [
        "## Intended use and limits",
        "",
        f"- It sorts images into the {n} classes above and nothing else: every image gets one of them, an image of "
        "none of them included. Use the probability to refuse uncertain answers where that matters.",
        "- The results were measured on held-out images from the same source as the training images. Other cameras, "
        "lighting, framing or subjects can do much worse: check it on your own images first.",
        f"- Images are reduced to {size} x {size} pixels, so details smaller than that resolution keeps are lost.",
        "- Whatever the training data leaves out, over-represents or mislabels, the model repeats.",
        "- Not for decisions about people, or where a wrong answer is dangerous, without an evaluation of its own.",
        "- The weights derive from the training data: add the licence that data allows (`license:` in the header) "
        "before sharing them.",
    ]


def model_card(ckpt_path: Path, ckpt: Checkpoint, files: list[str]) -> str:
    """The card's text for checkpoint ``ckpt`` (read from ``ckpt_path``) exported as ``files``."""
    results = _read_results(ckpt_path.parent)
    mc = ckpt.config.model
    n = len(ckpt.classes)
    params = sum(v.numel() for k, v in ckpt.model_state.items() if not k.startswith("pixel_"))
    shown = _data_name(ckpt, results).replace("the image folder ", "").replace("the label table ", "")
    title = f"# gMLP image classifier: {shown}, {n} classes"
    lines = [_header(ckpt_path, ckpt, files, results), title, ""]
    lines.append(
        f'A gMLP ("Pay Attention to MLPs", Liu et al. 2021) trained with gmlp-vision {__version__}: {params:,} '
        f"parameters, {mc.depth} blocks, {mc.image_size} x {mc.image_size} pixel input in {mc.patch_size} x "
        f"{mc.patch_size} patches."
    )
    lines += ["", "## Files", "", "| file | what it is |", "|---|---|"]
    lines += [f"| {_code(f, table=True)} | {FILES.get(f, 'ONNX graph (`gmlp export --out`)')} |" for f in files]
    lines += ["", *_data_section(ckpt, results), ""]
    lines += [*_results_section(ckpt_path, ckpt, results, shows_top5(n)), ""]
    lines += [*_training_section(ckpt), ""]
    lines += ["## Classes", "", f"In label order: {', '.join(_code(c) for c in ckpt.classes)}.", ""]
    lines += [*_usage_section(ckpt, files), "", *_limits_section(ckpt), "", MARKER, ""]
    return "\n".join(lines)


def write_model_card(checkpoint: str | Path, out_dir: str | Path, *, loaded: Checkpoint | None = None) -> Path | None:
    """Write ``out_dir/README.md``, the card of ``checkpoint`` listing the exports found in ``out_dir``.

    ``loaded``: the checkpoint already read from ``checkpoint`` (a file), so it is not read again.

    Returns:
        The card's path, or None when ``out_dir`` holds a ``README.md`` that `MARKER` does not end (left alone).

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
        ExportError: the card cannot be written (the message says why; nothing half-written is left).
    """
    ckpt_path = resolve_checkpoint(checkpoint)
    ckpt = loaded if loaded is not None else load_checkpoint(ckpt_path)
    out_dir = Path(out_dir)
    card = out_dir / "README.md"
    try:
        if MARKER not in card.read_text(errors="replace"):
            return None
    except FileNotFoundError:
        pass
    names = [name for name in FILES if (out_dir / name).is_file()]
    names += sorted(p.name for p in out_dir.glob("*.onnx") if p.name not in FILES)
    try:
        write_text(card, model_card(ckpt_path, ckpt, names))
    except OSError as e:
        raise ExportError(f"cannot write {card}: {why_not_written(card, e, 'export elsewhere with --out')}") from None
    return card


__all__ = ["MARKER", "model_card", "write_model_card"]
