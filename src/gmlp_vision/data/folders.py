"""Image-folder datasets: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``test/``), in memory or streamed.

The training files are put in a fixed pseudo-random order (seed 0, the same on every machine), so that the
validation fraction taken from the end of the training split (Keras ``validation_split``) samples every class, as
Keras' ``image_dataset_from_directory`` does by shuffling before it splits.

Two paths. Sets too large to hold decoded (``mode="auto"``: more than `MEMORY_LIMIT` bytes or a quarter of the RAM)
are streamed: each split is an `stream.ImageFiles`, decoded batch by batch in worker processes. Otherwise every image
(any size; PNG, JPEG, WebP, BMP, GIF, TIFF; grayscale, RGBA and palette images converted to RGB) is read defensively
(`images.load_image`), fitted to the model's input size by the same `images.resize` as everywhere else (``resize``
crop: shorter side to ``size / crop_pct``, then the centre crop, as prediction does; or squash), and stored as one
uint8 tensor per split, so training runs exactly like CIFAR, fully in memory. The decoded tensors are cached in the
data cache dir under a key made of the folder's absolute path, the image size, the resize rule, and every file's
relative path, size and modification time: a changed folder is decoded again. The cache is optional: a write that
fails (a full disk) is logged and the run goes on with the decoded tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from gmlp_vision.data.base import Dataset, LoadOptions, Split, default_cache_dir
from gmlp_vision.data.stream import ImageFiles, bad_image_error
from gmlp_vision.errors import DataError, ImageError, one_line
from gmlp_vision.images import IMAGE_EXTENSIONS, load_image, resize_uint8

log = logging.getLogger(__name__)
CACHE_VERSION = 4  # 2: training files in a fixed shuffled order; 3: 16-bit images scaled, not clipped; 4: --resize
MEMORY_LIMIT = 4 * 1024**3  # decoded bytes above which mode "auto" streams
Labelled = list[tuple[Path, int]]  # image files and their class indices


def _shuffled(paths: Labelled) -> Labelled:
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
    return [paths[i] for i in order]


def _labelled(files: dict[str, list[Path]], classes: list[str]) -> Labelled:
    return [(p, classes.index(c)) for c in classes for p in files[c]]


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return MEMORY_LIMIT * 4


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


def _decode(paths: Labelled, options: LoadOptions) -> Split:
    size = options.image_size
    images = torch.empty(len(paths), options.channels, size, size, dtype=torch.uint8)
    labels = torch.empty(len(paths), dtype=torch.int64)
    kept = 0
    for path, label in tqdm(paths, desc="decoding images", leave=False, disable=not options.progress):
        try:
            image = load_image(path, options.channels)
            images[kept] = resize_uint8(image, size, mode=options.resize, crop_pct=options.crop_pct, source=path)
        except ImageError as e:
            if not options.skip_bad:
                raise bad_image_error(e) from None
            log.warning("skipped %s", e)
            continue
        labels[kept] = label
        kept += 1
    if kept == 0:
        raise DataError("no readable images left after skipping bad files")
    return Split(images[:kept].clone(), labels[:kept].clone())


def _cache_key(root: Path, options: LoadOptions, splits: dict[str, dict[str, list[Path]]]) -> str:
    fit = f"{options.image_size}|{options.resize}|{options.crop_pct!r}|{options.channels}"
    h = hashlib.sha256(f"v{CACHE_VERSION}|{root.resolve()}|{fit}".encode())
    for name, files in splits.items():
        for cls, paths in files.items():
            for p in paths:
                st = p.stat()
                h.update(f"|{name}/{cls}/{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load_folder(name: str, path: str | Path | None, options: LoadOptions) -> Dataset:
    """The registry's loader for ``--dataset folder``: `load_image_folder` of ``path``."""
    if path is None:
        raise DataError("--dataset folder needs --data DIR (a folder with train/ and val/ or test/)")
    return load_image_folder(path, options)


def load_image_folder(root: str | Path, options: LoadOptions | None = None) -> Dataset:
    """Load ``root/train`` and ``root/val`` (or ``root/test``) class folders as a `Dataset`, in memory or streamed.

    Args:
        root: the folder holding ``train/`` and ``val/`` or ``test/``.
        options: the options that concern folders (default: `LoadOptions()`): ``image_size``, ``resize`` and
            ``crop_pct`` (how every image is fitted to the square input: `images.resize`), ``cache_dir`` (of the
            decoded tensors), ``skip_bad`` (leave out unreadable images, logged, instead of failing on the first),
            ``progress``, ``folder_mode`` (memory, stream or auto: see the module doc), and for streamed files
            ``workers`` and ``crop_scale`` (of the random-resized crops training asks for).

    Raises:
        DataError: missing folders, empty classes, train and val class sets that differ, or (without ``skip_bad``)
            an unreadable image, named in the message.
    """
    options = options if options is not None else LoadOptions()
    if options.channels not in (1, 3):
        raise DataError(f"--in-chans {options.channels}: image folders are read as RGB (3) or grayscale (1)")
    root = Path(root).expanduser()
    eval_dir, train_files, eval_files = _layout(root)
    classes = sorted(train_files)
    train_paths, eval_paths = _shuffled(_labelled(train_files, classes)), _labelled(eval_files, classes)
    decoded = (len(train_paths) + len(eval_paths)) * 3 * options.image_size**2
    mode = options.folder_mode
    if mode == "stream" or (mode == "auto" and decoded > min(MEMORY_LIMIT, _physical_memory() // 4)):
        log.info(
            "streaming %s: %d training and %d %s images, decoded by %d worker processes",
            root,
            len(train_paths),
            len(eval_paths),
            eval_dir.name,
            options.workers,
        )
        return replace(_streamed(train_paths, eval_paths, classes, options), test_split=eval_dir.name)
    key = _cache_key(root, options, {"train": train_files, eval_dir.name: eval_files})
    return replace(_in_memory(train_paths, eval_paths, classes, key, options), test_split=eval_dir.name)


def _layout(root: Path) -> tuple[Path, dict[str, list[Path]], dict[str, list[Path]]]:
    """The evaluation folder (val/ or test/) and both splits' files per class, checked to name the same classes."""
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
    return eval_dir, train_files, eval_files


def _streamed(train_paths: Labelled, eval_paths: Labelled, classes: list[str], options: LoadOptions) -> Dataset:
    splits = []
    for paths in (train_paths, eval_paths):
        files = ImageFiles(
            [str(p) for p, _ in paths],
            options.image_size,
            workers=options.workers,
            skip_bad=options.skip_bad,
            min_scale=options.crop_scale,
            resize=options.resize,
            crop_pct=options.crop_pct,
            channels=options.channels,
        )
        splits.append(Split(files, torch.tensor([label for _, label in paths], dtype=torch.int64)))
    return Dataset("folder", splits[0], splits[1], tuple(classes))


def _in_memory(
    train_paths: Labelled, eval_paths: Labelled, classes: list[str], key: str, options: LoadOptions
) -> Dataset:
    """Both splits decoded into uint8 tensors, from the cache when it holds them (else decoded and cached)."""
    cache = (options.cache_dir if options.cache_dir is not None else default_cache_dir()) / "folders"
    cached = cache / f"{key}{'-skip' if options.skip_bad else ''}.pt"
    if cached.is_file():
        try:
            blob = torch.load(cached, weights_only=True)
            return Dataset("folder", Split(*blob["train"]), Split(*blob["test"]), tuple(blob["classes"]))
        except Exception:  # a damaged cache is just decoded again
            log.warning("ignoring unreadable cache file %s", cached)
    train, test = _decode(train_paths, options), _decode(eval_paths, options)
    blob = {"train": [train.images, train.labels], "test": [test.images, test.labels], "classes": classes}
    _write_cache(cached, blob)
    return Dataset("folder", train, test, tuple(classes))


def _write_cache(cached: Path, blob: dict[str, object]) -> None:
    """Save ``blob`` to ``cached`` atomically; a failure (a full disk) costs only the cache, never the run."""
    tmp: str | None = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.replace(tmp, cached)
        tmp = None
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (ENOSPC among them) as a RuntimeError
        # On a full disk torch.save's RuntimeError ("unexpected pos ...") is raised while handling the ENOSPC OSError.
        reason = one_line(e.__context__ if isinstance(e.__context__, OSError) else e)
        log.warning("could not cache the decoded images in %s: %s; continuing without the cache", cached.parent, reason)
    finally:
        if tmp is not None:  # a partial file, whatever stopped the write (Ctrl-C too)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
