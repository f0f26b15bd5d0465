"""Datasets of image files, folders (``--dataset folder``) and label tables (``--dataset csv``), in memory or streamed.

Which file is in which split is `layout`'s business (folders with or without train/, tables, the hold-out). The
training files are put in a fixed pseudo-random order (seed 0, the same on every machine), so that the
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
from pathlib import Path

import torch
from tqdm import tqdm

from gmlp_vision.data.base import Dataset, LoadOptions, Split, default_cache_dir
from gmlp_vision.data.layout import Files, Labelled, describe_counts, folder_files, relative, table_files
from gmlp_vision.data.stream import ImageFiles, bad_image_error
from gmlp_vision.errors import DataError, ImageError, one_line
from gmlp_vision.images import load_image, resize_uint8

log = logging.getLogger(__name__)
CACHE_VERSION = 5  # 2: training files in a fixed shuffled order; 3: 16-bit scaled, not clipped; 4: --resize; 5: layouts
MEMORY_LIMIT = 4 * 1024**3  # decoded bytes above which mode "auto" streams


def _shuffled(paths: Labelled) -> Labelled:
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
    return [paths[i] for i in order]


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return MEMORY_LIMIT * 4


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


def _cache_key(files: Files, options: LoadOptions, splits: dict[str, Labelled]) -> str:
    fit = f"{options.image_size}|{options.resize}|{options.crop_pct!r}|{options.channels}"
    h = hashlib.sha256(f"v{CACHE_VERSION}|{files.root.resolve()}|{fit}|{files.classes}".encode())
    for name, paths in splits.items():
        for p, label in paths:
            st = p.stat()
            h.update(f"|{name}/{label}/{relative(p, files.root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load_folder(name: str, path: str | Path | None, options: LoadOptions) -> Dataset:
    """The registry's loader for ``--dataset folder``: `load_image_folder` of ``path``."""
    if path is None:
        raise DataError("--dataset folder needs --data DIR (class folders, with or without train/ and val/ or test/)")
    return load_image_folder(path, options)


def load_table(name: str, path: str | Path | None, options: LoadOptions) -> Dataset:
    """The registry's loader for ``--dataset csv``: the files a CSV or TSV of ``path,label[,split]`` rows names."""
    if path is None:
        raise DataError("--dataset csv needs --data FILE.csv (or .tsv) with path,label[,split] rows")
    _check_channels(options)
    table = Path(path).expanduser()
    return load_files("csv", table_files(table, options.holdout, options.holdout_files), options)


def load_image_folder(root: str | Path, options: LoadOptions | None = None) -> Dataset:
    """Load an image folder in any of `layout`'s layouts as a `Dataset`, in memory or streamed.

    Args:
        root: the folder: class folders, or ``train/`` (alone, or with ``val/`` and/or ``test/``) holding them.
        options: the options that concern folders (default: `LoadOptions()`): ``image_size``, ``resize`` and
            ``crop_pct`` (how every image is fitted to the square input: `images.resize`), ``cache_dir`` (of the
            decoded tensors), ``skip_bad`` (leave out unreadable images, logged, instead of failing on the first),
            ``progress``, ``folder_mode`` (memory, stream or auto: see the module doc), for streamed files
            ``workers`` and ``crop_scale`` (of the random-resized crops training asks for), and ``holdout`` and
            ``holdout_files`` (the test split of a folder without one).

    Raises:
        DataError: missing folders, empty classes, class sets that differ between splits, or (without ``skip_bad``)
            an unreadable image, named in the message.
    """
    options = options if options is not None else LoadOptions()
    _check_channels(options)
    return load_files("folder", folder_files(Path(root).expanduser(), options.holdout, options.holdout_files), options)


def _check_channels(options: LoadOptions) -> None:
    if options.channels not in (1, 3):
        raise DataError(f"--in-chans {options.channels}: image files are read as RGB (3) or grayscale (1)")


def load_files(name: str, files: Files, options: LoadOptions) -> Dataset:
    """The `Dataset` of ``files``: decoded into memory (cached) or streamed, as ``options.folder_mode`` says."""
    splits = {"train": _shuffled(files.train), files.test_split: files.test}
    if files.val is not None:
        splits["val"] = files.val
    decoded = sum(len(paths) for paths in splits.values()) * options.channels * options.image_size**2
    mode = options.folder_mode
    streamed = mode == "stream" or (mode == "auto" and decoded > min(MEMORY_LIMIT, _physical_memory() // 4))
    if streamed:
        log.info(
            "streaming %s (%s), decoded by %d worker processes", files.root, describe_counts(files), options.workers
        )
        parts = {split: _streamed_split(paths, options) for split, paths in splits.items()}
    else:
        parts = _in_memory(splits, _cache_key(files, options, splits), options)
    splits = (parts["train"], parts[files.test_split], tuple(files.classes), files.test_split)
    return Dataset(name, *splits, val=parts.get("val"), holdout=files.holdout, layout=files.layout)


def _streamed_split(paths: Labelled, options: LoadOptions) -> Split:
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
    return Split(files, torch.tensor([label for _, label in paths], dtype=torch.int64))


def _in_memory(splits: dict[str, Labelled], key: str, options: LoadOptions) -> dict[str, Split]:
    """Every split decoded into uint8 tensors, from the cache when it holds them (else decoded and cached)."""
    cache = (options.cache_dir if options.cache_dir is not None else default_cache_dir()) / "folders"
    cached = cache / f"{key}{'-skip' if options.skip_bad else ''}.pt"
    if cached.is_file():
        try:
            blob = torch.load(cached, weights_only=True)
            return {split: Split(*blob[split]) for split in splits}
        except Exception:  # a damaged cache is just decoded again
            log.warning("ignoring unreadable cache file %s", cached)
    parts = {split: _decode(paths, options) for split, paths in splits.items()}
    _write_cache(cached, {split: [part.images, part.labels] for split, part in parts.items()})
    return parts


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
