"""The embedded 8x8 digits: 1,797 handwritten digits shipped in this package (``digits.csv.gz``).

The file is the test set of the UCI "Optical Recognition of Handwritten Digits" data (Alpaydin and Kaynak, 1998),
byte for byte the copy scikit-learn ships; licence and attribution in ``digits-LICENSE.txt`` beside it. Parsed with
numpy. Pixels 0..16 become uint8 ``round(v * 255 / 16)``. The split is fixed and stratified: within each class, in
file order, samples 4, 9, 14, ... (every 5th) go to test, the rest to train, so each class has ``floor(count / 5)``
test images; both splits keep file order.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from gmlp_vision.data.base import Dataset, LoadOptions, Split
from gmlp_vision.errors import DataError, one_line

DIGITS_FILE = Path(__file__).with_name("digits.csv.gz")


def load_digits(name: str, path: str | Path | None, options: LoadOptions) -> Dataset:
    """The digits from ``path`` (a ``digits.csv(.gz)``: 64 pixels and a label per row), default `DIGITS_FILE`."""
    return _load_digits(DIGITS_FILE if path is None else Path(path).expanduser())


def _load_digits(file: Path) -> Dataset:
    try:
        table = np.loadtxt(file, delimiter=",", ndmin=2)
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise DataError(f"{file} is not a readable digits CSV ({type(e).__name__}: {one_line(e)})") from e
    if table.shape[1] != 65 or not len(table) or np.any(table != np.rint(table)):
        raise DataError(f"{file} must hold rows of 64 integer pixels and a label, got shape {table.shape}")
    pixels, target = table[:, :64].astype(np.int64), table[:, 64].astype(np.int64)
    if pixels.min() < 0 or pixels.max() > 16 or target.min() < 0 or target.max() > 9:
        raise DataError(f"{file} must hold pixels in 0..16 and labels in 0..9")
    images = ((pixels * 255 + 8) // 16).astype(np.uint8).reshape(-1, 1, 8, 8)  # round(v * 255 / 16); ties only at 8
    test = np.zeros(len(target), dtype=bool)
    for c in range(10):
        test[np.flatnonzero(target == c)[4::5]] = True  # every 5th sample of each class, in file order
    train_split = Split(torch.from_numpy(images[~test]), torch.from_numpy(target[~test]))
    test_split = Split(torch.from_numpy(images[test]), torch.from_numpy(target[test]))
    return Dataset("digits", train_split, test_split, tuple(str(c) for c in range(10)))
