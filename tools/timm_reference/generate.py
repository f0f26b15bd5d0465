"""Write tests/fixtures/timm/rand_augment.npz: timm's own RandAugment ops on fixed images at fixed parameters.

Run with timm importable (see README.md: installed with --no-deps into a folder outside the repository, plus the
torchvision stand-in of benchmarks/_stubs). The transform is built as DeiT builds it: timm's ``create_transform`` with
``auto_augment="rand-m9-mstd0.5-inc1"``, ``interpolation="bicubic"``, 224 px, ImageNet's mean (its ``aa_params``:
``translate_const``, ``img_mean``, ``interpolation``), then every op of it is run through timm's ``AugmentOp`` with
probability 1 and no magnitude noise, at fixed magnitudes and both signs. tests/test_policy.py compares
``gmlp_vision.policy_timm`` with the file.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "timm" / "rand_augment.npz"
CONFIG = "rand-m9-mstd0.5-inc1"  # DeiT's --aa
IMG_SIZE = 224  # DeiT's input size: translate_const = int(224 * 0.45) (unused by the "Rel" translations of inc1)
MAGNITUDES = (0.0, 3.3, 9.0, 10.0)
H, W = 20, 24  # not square, so that the axes cannot be swapped unnoticed


def images() -> np.ndarray:
    """Four (H, W, 3) uint8 images: gradients, noise, a bright block; the last one with a constant blue channel."""
    rs = np.random.RandomState(0)
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for k in range(4):
        base = np.stack([xx * (6 + k), yy * (9 - k), (xx + yy) * 4 + 20 * k], -1).astype(np.int64)
        img = base + rs.randint(0, 70, (H, W, 3))
        img[4 + k : 9 + k, 6:12] += 90
        if k == 3:
            img[..., 2] = 77
        out.append(np.clip(img, 0, 255))
    return np.stack(out).astype(np.uint8)


def deit_transform():
    """timm's RandAugment with DeiT's hparams, as ``timm.data.create_transform`` computes them."""
    from timm.data import IMAGENET_DEFAULT_MEAN
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    # The factory imports torchvision's transforms (stubbed here), so its source is read rather than run: these are
    # the lines that make its aa_params, rebuilt below.
    factory = Path(importlib.util.find_spec("timm.data.transforms_factory").origin).read_text()
    for line in (
        "translate_const=int(img_size_min * 0.45)",
        "img_mean=tuple([min(255, round(255 * x)) for x in mean])",
    ):
        assert line in factory, f"timm's create_transform changed: {line!r} not found"
    aa_params = dict(
        translate_const=int(IMG_SIZE * 0.45),
        img_mean=tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN),
        interpolation=str_to_pil_interp("bicubic"),
    )
    return rand_augment_transform(CONFIG, aa_params)


def seed_for(negative: bool) -> int:
    """A seed after which timm's ``_randomly_negate`` (``random.random() > 0.5``) negates exactly when asked."""
    seed = 0
    while True:
        random.seed(seed)
        if (random.random() > 0.5) == negative:
            return seed
        seed += 1


def run_op(op, img: Image.Image, magnitude: float, negative: bool) -> tuple[np.ndarray, float, bool]:
    """One timm ``AugmentOp`` at ``magnitude``, always applied, sign fixed: its output, argument, and emulation flag."""
    from timm.data.auto_augment import AugmentOp

    fixed = AugmentOp(op.name, prob=1.0, magnitude=magnitude, hparams={**op.hparams, "magnitude_std": 0})
    seed = seed_for(negative)
    random.seed(seed)
    args = fixed.level_fn(magnitude, fixed.hparams) if fixed.level_fn is not None else (0,)
    random.seed(seed)  # prob 1 and no noise: the sign is the op's only draw (the resample is fixed: bicubic)
    try:
        return np.asarray(fixed(img)), float(args[0]), False
    except ValueError:
        # Pillow >= 13 refuses to keep 0 bits (PosterizeIncreasing at magnitude 10); older Pillow, DeiT's, gave black.
        assert op.name == "PosterizeIncreasing" and args[0] == 0, (op.name, args)
        return np.asarray(img.point([i & ~255 for i in range(256)] * 3)), float(args[0]), True


def main(out: Path = OUT) -> None:
    import timm

    ra = deit_transform()
    names = [op.name for op in ra.ops]
    first = ra.ops[0]
    imgs = images()
    rows: dict[str, list] = {k: [] for k in ("op", "image", "magnitude", "negative", "arg", "emulated", "output")}
    for k, op in enumerate(ra.ops):
        for magnitude in MAGNITUDES:
            for negative in (False, True):
                i = len(rows["op"]) % len(imgs)
                output, arg, emulated = run_op(op, Image.fromarray(imgs[i]), magnitude, negative)
                if negative and arg == rows["arg"][-1]:
                    continue  # no sign (an unsigned op, or magnitude 0): the positive case says it all
                for key, value in zip(rows, (k, i, magnitude, negative, arg, emulated, output), strict=True):
                    rows[key].append(value)
    meta = dict(timm=timm.__version__, pillow=PIL.__version__, config=CONFIG, img_size=IMG_SIZE)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        ops=np.array(names),
        images=imgs,
        fill=np.array(first.kwargs["fillcolor"], dtype=np.int64),
        resample=np.array(int(first.kwargs["resample"])),
        prob=np.array(first.prob),
        magnitude=np.array(float(first.magnitude)),
        magnitude_std=np.array(float(first.magnitude_std)),
        num_layers=np.array(ra.num_layers),
        meta=np.array(json.dumps(meta, sort_keys=True)),
        **{f"case_{key}": np.array(value) for key, value in rows.items() if key != "output"},
        outputs=np.stack(rows["output"]).astype(np.uint8),
    )
    print(f"{len(rows['op'])} cases of {len(names)} ops ({sum(rows['emulated'])} emulated), {meta}")
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
