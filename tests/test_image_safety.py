"""Image files: only the accepted formats are opened (no Ghostscript behind a .png name), high-bit images are scaled.

The CLI tests run the real ``gmlp`` in a subprocess with a fake ``gs`` first on PATH: Pillow's EPS plugin runs
whatever ``gs`` it finds, so the fake leaving no marker file proves Ghostscript was never started.
"""

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gmlp_vision.checkpoint import Checkpoint, save_checkpoint
from gmlp_vision.config import from_preset
from gmlp_vision.data.stream import decode_crop
from gmlp_vision.errors import ImageError
from gmlp_vision.images import load_image, pil_to_tensor
from gmlp_vision.model import GMLP

EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
)
TRAIN = ["train", "--dataset", "folder", "--preset", "tiny", "--epochs", "1", "--image-size", "8", "--patch-size", "4",
         "--embed-dim", "8", "--ffn-dim", "8", "--depth", "1", "--batch-size", "4", "--threads", "1", "--no-progress",
         "--no-flip", "--zoom", "0"]  # fmt: skip
ACCEPTED = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # the README's formats (MPO: phone JPEGs, via JPEG)
V8 = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit value once


@pytest.fixture
def env(tmp_path):
    """Environment for a CLI subprocess: a fake ``gs`` that touches ``tmp_path/gs-ran``, caches under tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{tmp_path / 'gs-ran'}'\nexit 0\n")
    gs.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "GMLP_DATA": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}  # fmt: skip


def gmlp(env, *args):
    return subprocess.run([sys.executable, "-m", "gmlp_vision", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def assert_one_line_error(done, name):
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert name in lines[0] and "TIFF" in lines[0] and "Traceback" not in done.stderr


def test_the_fake_gs_is_what_pillow_would_run(env, tmp_path):
    """Guards the tests below: without the format list, Pillow opens the EPS and runs the fake gs."""
    (tmp_path / "x.png").write_bytes(EPS)
    code = "import sys; from PIL import Image; Image.open(sys.argv[1]).load()"
    subprocess.run([sys.executable, "-c", code, tmp_path / "x.png"], env=env, capture_output=True, timeout=60)
    assert (tmp_path / "gs-ran").exists()


def test_predict_refuses_an_eps_named_png_without_running_ghostscript(env, tmp_path):
    cfg = from_preset("tiny", num_classes=2, depth=1, embed_dim=8, ffn_dim=8, image_size=8, patch_size=4)
    save_checkpoint(tmp_path / "c.pt", Checkpoint(cfg, GMLP(cfg.model).state_dict(), ("a", "b"), 1, 2, {"loss": 1.0}))
    (tmp_path / "x.png").write_bytes(EPS)
    done = gmlp(env, "predict", tmp_path / "c.pt", tmp_path / "x.png", "--device", "cpu")
    assert not (tmp_path / "gs-ran").exists()
    assert_one_line_error(done, str(tmp_path / "x.png"))


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_training_on_a_folder_with_an_eps_named_png_fails_or_skips_without_running_ghostscript(env, tmp_path, mode):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls, value in (("dark", 30), ("light", 220)):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (value, value + i, value)).save(root / split / cls / f"{i}.png")
    (root / "train" / "dark" / "x.png").write_bytes(EPS)
    argv = [*TRAIN, "--data", root, "--folder-mode", mode, *(["--workers", "0"] if mode == "stream" else [])]
    done = gmlp(env, *argv, "--out", tmp_path / "fails")
    assert not (tmp_path / "gs-ran").exists()
    assert_one_line_error(done, "x.png")
    assert not (tmp_path / "fails" / "results.json").exists()
    done = gmlp(env, *argv, "--skip-bad-images", "--out", tmp_path / "skips")
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stderr and "x.png" in done.stderr
    assert (tmp_path / "skips" / "results.json").is_file()
    assert not (tmp_path / "gs-ran").exists()


def test_every_accepted_format_opens_and_others_are_refused(tmp_path):
    rgb = np.stack([V8, 255 - V8, V8 // 2], -1)
    for fmt, ext in zip(ACCEPTED, ("png", "jpg", "webp", "bmp", "gif", "tif"), strict=True):
        Image.fromarray(rgb).save(tmp_path / f"a.{ext}", format=fmt)
        assert load_image(tmp_path / f"a.{ext}").shape == (3, 16, 16)
    # Many phone JPEGs are MPO (a JPEG with extra frames): Pillow's JPEG opener gives them as format "MPO".
    Image.fromarray(rgb).save(
        tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))]
    )
    with Image.open(tmp_path / "phone.jpg") as image:
        assert image.format == "MPO"
    assert load_image(tmp_path / "phone.jpg").shape == (3, 16, 16)
    for fmt in ("PPM", "TGA", "ICO", "PCX", "EPS"):
        Image.fromarray(rgb).save(tmp_path / "other.png", format=fmt)
        with pytest.raises(ImageError, match="not an image file") as info:
            load_image(tmp_path / "other.png")
        assert str(tmp_path / "other.png") in str(info.value) and all(f in str(info.value) for f in ACCEPTED)


def write_png16(path, array, color_type):
    """A 16-bit PNG written by hand (Pillow writes 16-bit grayscale only): color type 0 gray, 2 RGB, 6 RGBA."""
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def high_bit_files(tmp_path):
    """The 8-bit gradient `V8` stored in every high-bit form, and the mode Pillow opens each in."""
    v16 = V8.astype(np.uint16) * 257  # 0..255 -> 0..65535 exactly
    files = {
        "png16": (Image.fromarray(v16), "PNG", "I;16"),
        "tiff16": (Image.fromarray(v16), "TIFF", "I;16"),
        "tiff16-big-endian": (Image.frombytes("I;16B", (16, 16), v16.astype(">u2").tobytes()), "TIFF", "I;16B"),
        "tiff32-int": (Image.fromarray(v16.astype(np.int32)), "TIFF", "I"),
        "tiff-float-0-1": (Image.fromarray(V8.astype(np.float32) / 255), "TIFF", "F"),
        "tiff-float-0-255": (Image.fromarray(V8.astype(np.float32)), "TIFF", "F"),
        "tiff-float-0-65535": (Image.fromarray(v16.astype(np.float32)), "TIFF", "F"),
    }
    out = {}
    for name, (image, fmt, mode) in files.items():
        image.save(tmp_path / f"{name}.img", format=fmt)
        out[name] = (tmp_path / f"{name}.img", mode)
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_high_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path, channels):
    expected = torch.from_numpy(V8).expand(channels, 16, 16)
    for name, (path, mode) in high_bit_files(tmp_path).items():
        with Image.open(path) as image:
            assert image.mode == mode, name  # the forms this test means to cover
        assert torch.equal(load_image(path, channels), expected), name


def test_16_bit_rgb_png_reads_as_its_8_bit_copy(tmp_path):
    rgb8 = np.stack([V8, 255 - V8, V8 // 2], -1)
    write_png16(tmp_path / "rgb16.png", rgb8.astype(np.uint16) * 257, 2)
    write_png16(
        tmp_path / "rgba16.png",
        np.concatenate([rgb8, np.full((16, 16, 1), 9, np.uint8)], -1).astype(np.uint16) * 257,
        6,
    )
    for name in ("rgb16.png", "rgba16.png"):
        assert torch.equal(load_image(tmp_path / name), torch.from_numpy(rgb8).permute(2, 0, 1))


def test_high_bit_scaling_rounds_and_clamps():
    # 16 bits: round(v * 255 / 65535), i.e. round(v / 257).
    image = Image.fromarray(np.array([[0, 128, 129, 385, 386, 65535]], dtype=np.uint16))
    assert pil_to_tensor(image, 1).flatten().tolist() == [0, 0, 1, 1, 2, 255]
    # "I" is read as 16 bits: outside 0..65535 is clamped.
    image = Image.fromarray(np.array([[-5, 0, 257, 65535, 70000]], dtype=np.int32))
    assert pil_to_tensor(image, 1).flatten().tolist() == [0, 0, 1, 255, 255]
    # "F": the smallest of 0..1, 0..255, 0..65535 holding the largest value; NaN and negatives are 0.
    floats = {(0.0, 0.5, 1.0): [0, 128, 255], (0.0, 1.5, 255.0, -1.0): [0, 2, 255, 0],
              (0.0, 257.0, 65535.0, 1e9, float("nan")): [0, 1, 255, 255, 0]}  # fmt: skip
    for values, pixels in floats.items():
        image = Image.fromarray(np.array([values], dtype=np.float32))
        assert pil_to_tensor(image, 1).flatten().tolist() == pixels, values


def test_streamed_crops_of_a_16_bit_png_match_its_8_bit_copy(tmp_path):
    Image.fromarray(V8).save(tmp_path / "8.png")
    Image.fromarray(V8.astype(np.uint16) * 257).save(tmp_path / "16.png")
    for key in range(3):
        assert torch.equal(
            decode_crop(str(tmp_path / "16.png"), 8, 0.25, key), decode_crop(str(tmp_path / "8.png"), 8, 0.25, key)
        )
