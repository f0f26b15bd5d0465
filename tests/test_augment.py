import numpy as np
import pytest
import torch

from gmlp_vision.augment import augment_batch, flip_lr, random_zoom, zoom
from gmlp_vision.images import resize


def tf_reflect(coord: float, size: int) -> float:
    """TensorFlow's ImageProjectiveTransform REFLECT fill mode (d c b a | a b c d) for one coordinate."""
    if coord < 0:
        sz2 = 2 * size
        if coord < -sz2:
            coord = sz2 * int(-coord / sz2) + coord
        coord = coord + sz2 if coord < -size else -coord - 1
    elif coord > size - 1:
        sz2 = 2 * size
        coord -= sz2 * int(coord / sz2)
        if coord >= size:
            coord = sz2 - coord - 1
    return min(max(coord, 0.0), size - 1.0)


def naive_zoom(img: np.ndarray, zx: float, zy: float) -> np.ndarray:
    """Per-pixel loop: output (x, y) samples input (zx (x - cx) + cx, zy (y - cy) + cy), bilinear, TF reflect."""
    C, H, W = img.shape
    out = np.zeros_like(img, dtype=np.float64)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    for y in range(H):
        for x in range(W):
            sx = tf_reflect(zx * (x - cx) + cx, W)
            sy = tf_reflect(zy * (y - cy) + cy, H)
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            x1, y1 = min(x0 + 1, W - 1), min(y0 + 1, H - 1)
            fx, fy = sx - x0, sy - y0
            out[:, y, x] = (1 - fy) * ((1 - fx) * img[:, y0, x0] + fx * img[:, y0, x1]) + fy * (
                (1 - fx) * img[:, y1, x0] + fx * img[:, y1, x1]
            )
    return out


@pytest.mark.parametrize("factors", [(0.8, 1.2), (1.2, 0.8), (1.0, 1.0), (0.93, 1.11), (1.2, 1.2)])
def test_zoom_matches_per_pixel_reference(factors):
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, size=(3, 10, 14)).astype(np.float32)
    out = zoom(torch.from_numpy(img)[None], torch.tensor([factors]))[0].numpy()
    np.testing.assert_allclose(out, naive_zoom(img, *factors), atol=2e-3)


def test_zoom_one_is_identity_and_larger_factor_shows_less():
    x = torch.rand(2, 3, 32, 32) * 255
    torch.testing.assert_close(zoom(x, torch.ones(2, 2)), x, atol=1e-4, rtol=0)
    # Zoom > 1 shows less content: a bright centre square shrinks; zoom < 1 shows more: it grows.
    img = torch.zeros(1, 1, 32, 32)
    img[..., 12:20, 12:20] = 1
    assert zoom(img, torch.tensor([[1.2, 1.2]])).sum() < img.sum() < zoom(img, torch.tensor([[0.8, 0.8]])).sum()


def test_flip_mirrors_about_half_and_keeps_pairs():
    torch.manual_seed(0)
    n = 400
    x = torch.arange(8, dtype=torch.float32).repeat(n, 3, 8, 1)  # each row 0..7
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32) + 100  # an id that a flip moves but keeps
    g = torch.Generator().manual_seed(1)
    y = flip_lr(x, g)
    flipped = y[:, 1, 0, 0] == 7
    assert 0.4 < flipped.float().mean() < 0.6
    assert torch.equal(y[flipped], x[flipped].flip(-1))
    assert torch.equal(y[~flipped], x[~flipped])
    ids = torch.where(flipped, y[:, 0, 0, 7], y[:, 0, 0, 0])
    assert torch.equal(ids, torch.arange(n, dtype=torch.float32) + 100)


def test_augmentation_keeps_shape_dtype_labels_and_repeats_with_seed():
    # Constant images stay constant under flip and zoom (bilinear of a constant), so the pairing is visible.
    labels = torch.arange(64)
    x = labels.float()[:, None, None, None].expand(64, 3, 32, 32).contiguous()
    a = augment_batch(x, flip=True, zoom_amount=0.2, generator=torch.Generator().manual_seed(5))
    b = augment_batch(x, flip=True, zoom_amount=0.2, generator=torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a.amin((1, 2, 3)), labels.float())
    torch.testing.assert_close(a.amax((1, 2, 3)), labels.float())
    assert torch.equal(a, b)
    r = torch.rand(8, 3, 32, 32)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    assert not torch.equal(random_zoom(r, 0.2, g1), random_zoom(r, 0.2, g2))


def test_random_zoom_factor_range():
    # Zoom of a horizontal ramp: the output's slope is the x factor, which must lie in [0.8, 1.2].
    ramp = torch.arange(32, dtype=torch.float32).repeat(500, 1, 32, 1)
    out = random_zoom(ramp, 0.2, torch.Generator().manual_seed(0))
    slope = (out[:, 0, 16, 20] - out[:, 0, 16, 11]) / 9
    assert slope.min() >= 0.8 - 1e-4 and slope.max() <= 1.2 + 1e-4
    assert slope.min() < 0.82 and slope.max() > 1.18


def test_resize():
    x = torch.rand(2, 1, 8, 8)
    assert resize(x, 8) is x
    up = resize(x, 32)
    assert up.shape == (2, 1, 32, 32)
    torch.testing.assert_close(up.mean(), x.mean(), atol=0.02, rtol=0)
