"""Image-folder datasets: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``test/``), decoded once into memory.

Every image (any size; PNG, JPEG, WebP, BMP, GIF, TIFF; grayscale, RGBA and palette images converted to RGB) is read
defensively (`images.load_image`), resized to the model's input size with the same antialiased `augment.resize` as
everywhere else, and stored as one uint8 tensor per split, so training runs exactly like CIFAR, fully in memory. The
decoded tensors are cached in the data cache dir under a key made of the folder's absolute path, the image size, and
every file's relative path, size and modification time: a changed folder is decoded again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from gmlp_vision.augment import resize
from gmlp_vision.data import Dataset, Split, default_cache_dir
from gmlp_vision.errors import DataError, ImageError
from gmlp_vision.images import IMAGE_EXTENSIONS, load_image

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} holds no class folders (expected {split_dir}/<class>/<images>)")
    files = {}
    for folder in classes:
        images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DataError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files[folder.name] = images
    return files


def _decode(files: dict[str, list[Path]], classes: list[str], size: int, skip_bad: bool, progress: bool) -> Split:
    paths = [(p, classes.index(c)) for c in classes for p in files[c]]
    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(paths), dtype=torch.int64)
    kept = 0
    for path, label in tqdm(paths, desc="decoding images", leave=False, disable=not progress):
        try:
            image = load_image(path, 3)
        except ImageError as e:
            if not skip_bad:
                raise DataError(f"{e} (pass --skip-bad-images to leave such files out)") from None
            log.warning("skipped %s", e)
            continue
        images[kept] = resize(image[None].float(), size)[0].round().clamp(0, 255).to(torch.uint8)
        labels[kept] = label
        kept += 1
    if kept == 0:
        raise DataError("no readable images left after skipping bad files")
    return Split(images[:kept].clone(), labels[:kept].clone())


def _cache_key(root: Path, size: int, splits: dict[str, dict[str, list[Path]]]) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{root.resolve()}|{size}".encode())
    for name, files in splits.items():
        for cls, paths in files.items():
            for p in paths:
                st = p.stat()
                h.update(f"|{name}/{cls}/{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load_image_folder(
    root: str | Path,
    image_size: int,
    *,
    cache_dir: Path | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> Dataset:
    """Load ``root/train`` and ``root/val`` (or ``root/test``) class folders as an in-memory `Dataset`.

    Args:
        root: the folder holding ``train/`` and ``val/`` or ``test/``.
        image_size: side every image is resized to.
        cache_dir: where the decoded tensors are cached (default: the data cache dir).
        skip_bad: leave out unreadable images (logged) instead of failing on the first one.
        progress: show a progress bar while decoding.

    Raises:
        DataError: missing folders, empty classes, train and val class sets that differ, or (without ``skip_bad``)
            an unreadable image, named in the message.
    """
    root = Path(root).expanduser()
    if not (root / "train").is_dir():
        raise DataError(f"{root} has no train/ folder (expected {root}/train/<class>/... and val/ or test/)")
    eval_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if eval_dir is None:
        raise DataError(f"{root} has no val/ or test/ folder next to train/")
    train_files, eval_files = _class_files(root / "train"), _class_files(eval_dir)
    if set(train_files) != set(eval_files):
        only_train = sorted(set(train_files) - set(eval_files))
        only_eval = sorted(set(eval_files) - set(train_files))
        raise DataError(
            f"class folders differ between train/ and {eval_dir.name}/: only in train: {only_train or 'none'}; "
            f"only in {eval_dir.name}: {only_eval or 'none'}"
        )
    classes = sorted(train_files)
    cache = (cache_dir if cache_dir is not None else default_cache_dir()) / "folders"
    key = _cache_key(root, image_size, {"train": train_files, eval_dir.name: eval_files})
    cached = cache / f"{key}{'-skip' if skip_bad else ''}.pt"
    if cached.is_file():
        try:
            blob = torch.load(cached, weights_only=True)
            return Dataset("folder", Split(*blob["train"]), Split(*blob["test"]), tuple(blob["classes"]))
        except Exception:  # a damaged cache is just decoded again
            log.warning("ignoring unreadable cache file %s", cached)
    train = _decode(train_files, classes, image_size, skip_bad, progress)
    test = _decode(eval_files, classes, image_size, skip_bad, progress)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        torch.save({"train": [train.images, train.labels], "test": [test.images, test.labels], "classes": classes}, f)
    os.replace(tmp, cached)
    return Dataset("folder", train, test, tuple(classes))
