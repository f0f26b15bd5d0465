"""Generate reference fixtures from the real Keras 2.15 / TF-Addons 0.23 code of the gMLP tutorial.

Run with the separate TensorFlow environment (never a project dependency), from the repository root:

    /work/tfref/bin/python tools/keras_reference/generate.py [OUTPUT_DIR]

OUTPUT_DIR defaults to tests/fixtures/keras. Writes forward.npz, zoom.npz, adamw.npz and callbacks.json;
see README.md beside this file for their contents. Everything is seeded: reruns give the same files
(bit-for-bit for the numbers; npz zip timestamps aside).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.pop("TF_USE_LEGACY_KERAS", None)  # TF 2.15 bundles Keras 2.15 itself; "1" would look for tf_keras
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
warnings.filterwarnings("ignore")

# `keras` is the Keras 2.15 package that tf.keras points to; RandomZoom's helpers (get_zoom_matrix, transform) live in
# keras.src.layers.preprocessing.image_preprocessing, the module of keras.layers.RandomZoom.
import keras as keras_package  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_addons as tfa  # noqa: E402
from keras.src.layers.preprocessing import image_preprocessing as kip  # noqa: E402
from tensorflow import keras  # noqa: E402
from tensorflow.keras import layers  # noqa: E402

KERAS_VERSION = keras_package.__version__

SEED = 20220508
FAILURES: list[str] = []


def check(cond: bool, what: str) -> None:
    print(("  ok   " if cond else "  FAIL ") + what)
    if not cond:
        FAILURES.append(what)


def header(title: str) -> None:
    print()
    print("=" * 8, title)


# ---------------------------------------------------------------------------------------------------------------------
# The tutorial's code (hyper-parameters and layers verbatim, wrapped in functions so it can be rebuilt)
# ---------------------------------------------------------------------------------------------------------------------
num_classes = 100
input_shape = (32, 32, 3)
weight_decay = 0.0001
batch_size = 128
num_epochs = 100
dropout_rate = 0.2
image_size = 32
patch_size = 4
num_patches = (image_size // patch_size) ** 2
embedding_dim = 128
num_blocks = 4
learning_rate = 0.003


def make_data_augmentation():
    return keras.Sequential(
        [
            layers.Normalization(),
            layers.Resizing(image_size, image_size),
            layers.RandomFlip("horizontal"),
            layers.RandomZoom(height_factor=0.2, width_factor=0.2),
        ],
        name="data_augmentation",
    )


class Patches(layers.Layer):
    def __init__(self, patch_size, num_patches):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = num_patches

    def call(self, images):
        batch_size = tf.shape(images)[0]
        patches = tf.image.extract_patches(
            images=images,
            sizes=[1, self.patch_size, self.patch_size, 1],
            strides=[1, self.patch_size, self.patch_size, 1],
            rates=[1, 1, 1, 1],
            padding="VALID",
        )
        patch_dims = patches.shape[-1]
        patches = tf.reshape(patches, [batch_size, self.num_patches, patch_dims])
        return patches


class gMLPLayer(layers.Layer):  # noqa: N801 (the tutorial's name)
    def __init__(self, num_patches, embedding_dim, dropout_rate, *args, **kwargs):
        super().__init__(*args, **kwargs)

        self.channel_projection1 = keras.Sequential(
            [
                layers.Dense(units=embedding_dim * 2),
                tfa.layers.GELU(),
                layers.Dropout(rate=dropout_rate),
            ]
        )

        self.channel_projection2 = layers.Dense(units=embedding_dim)

        self.spatial_projection = layers.Dense(units=num_patches, bias_initializer="Ones")

        self.normalize1 = layers.LayerNormalization(epsilon=1e-6)
        self.normalize2 = layers.LayerNormalization(epsilon=1e-6)

    def spatial_gating_unit(self, x):
        u, v = tf.split(x, num_or_size_splits=2, axis=2)
        v = self.normalize2(v)
        v_channels = tf.linalg.matrix_transpose(v)
        v_projected = self.spatial_projection(v_channels)
        v_projected = tf.linalg.matrix_transpose(v_projected)
        return u * v_projected

    def call(self, inputs):
        x = self.normalize1(inputs)
        x_projected = self.channel_projection1(x)
        x_spatial = self.spatial_gating_unit(x_projected)
        x_projected = self.channel_projection2(x_spatial)
        return x + x_projected


def build_classifier(blocks, data_augmentation):
    inputs = layers.Input(shape=input_shape)
    augmented = data_augmentation(inputs)
    patches_layer = Patches(patch_size, num_patches)
    patches = patches_layer(augmented)
    embed = layers.Dense(units=embedding_dim)
    x = embed(patches)
    x = blocks(x)
    representation = layers.GlobalAveragePooling1D()(x)
    representation = layers.Dropout(rate=dropout_rate)(representation)
    head = layers.Dense(num_classes)
    logits = head(representation)
    model = keras.Model(inputs=inputs, outputs=logits)
    return model, patches_layer, embed, head


def make_optimizer(lr=learning_rate):
    return tfa.optimizers.AdamW(learning_rate=lr, weight_decay=weight_decay)


# ---------------------------------------------------------------------------------------------------------------------
# 1. forward.npz
# ---------------------------------------------------------------------------------------------------------------------
def q(a: np.ndarray, step: float = 2.0**-8) -> np.ndarray:
    """Round to a multiple of `step` (exact in float32 and bfloat16-friendly; also compresses well)."""
    return (np.round(np.asarray(a, np.float64) / step) * step).astype(np.float32)


def glorot(rng: np.random.RandomState, fan_in: int, fan_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return q(rng.uniform(-limit, limit, size=(fan_in, fan_out)))


def gen_forward(out_dir: str) -> None:
    header("forward.npz: the tutorial model, inference mode")
    tf.keras.utils.set_random_seed(SEED)
    rng = np.random.RandomState(SEED)

    data_augmentation = make_data_augmentation()
    adapt_images = rng.randint(0, 256, size=(64, 32, 32, 3)).astype(np.uint8)
    data_augmentation.layers[0].adapt(adapt_images)
    norm = data_augmentation.layers[0]
    mean = np.asarray(norm.mean).reshape(-1).astype(np.float32)
    var = np.asarray(norm.variance).reshape(-1).astype(np.float32)
    x64 = adapt_images.astype(np.float64).reshape(-1, 3)
    print("  norm.mean", mean, "numpy", x64.mean(0))
    print("  norm.variance", var, "numpy (population, ddof=0)", x64.var(0), "ddof=1", x64.var(0, ddof=1))
    check(np.allclose(mean, x64.mean(0), rtol=1e-5), "Normalization.adapt mean = per-channel mean over N,H,W")
    check(np.allclose(var, x64.var(0), rtol=1e-4), "Normalization.adapt variance = population variance (ddof=0)")

    gmlp_blocks = keras.Sequential([gMLPLayer(num_patches, embedding_dim, dropout_rate) for _ in range(num_blocks)])
    model, patches_layer, embed, head = build_classifier(gmlp_blocks, data_augmentation)
    model.compile(
        optimizer=make_optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="acc"),
            keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5-acc"),
        ],
    )
    trainable = int(sum(int(np.prod(v.shape)) for v in model.trainable_weights))
    non_trainable = int(sum(int(np.prod(v.shape)) for v in model.non_trainable_weights))
    total = int(model.count_params())
    print(f"  model.count_params() = {total:,}; trainable = {trainable:,}; non-trainable = {non_trainable:,}")
    check(trainable == 236_004, "236,004 trainable parameters")
    check(total == 236_011, "count_params() = 236,011 (7 normalisation statistics: mean 3, variance 3, count 1)")

    # Default initialisers as the tutorial has them (checked before we overwrite them).
    b0 = gmlp_blocks.layers[0]
    check(np.all(b0.spatial_projection.bias.numpy() == 1.0), "spatial bias initialised to ones")
    check(np.all(b0.channel_projection2.bias.numpy() == 0.0), "channel Dense bias initialised to zeros")
    check(b0.normalize1.epsilon == 1e-6 and b0.normalize2.epsilon == 1e-6, "LayerNorm epsilon 1e-6")
    k = b0.spatial_projection.kernel.numpy()
    lim = np.sqrt(6.0 / 128)
    check(np.abs(k).max() <= lim and np.abs(k).max() > 0.9 * lim, "spatial kernel Glorot-uniform (limit sqrt(6/128))")

    # Non-trivial, seeded weights.
    w: dict[str, np.ndarray] = {}
    w["embed.kernel"] = glorot(rng, 48, embedding_dim)
    w["embed.bias"] = q(0.1 * rng.randn(embedding_dim))
    embed.set_weights([w["embed.kernel"], w["embed.bias"]])
    for i, blk in enumerate(gmlp_blocks.layers):
        p = f"blocks.{i}."
        w[p + "norm1.gamma"] = q(1.0 + 0.1 * rng.randn(embedding_dim))
        w[p + "norm1.beta"] = q(0.1 * rng.randn(embedding_dim))
        w[p + "proj_in.kernel"] = glorot(rng, embedding_dim, 2 * embedding_dim)
        w[p + "proj_in.bias"] = q(0.1 * rng.randn(2 * embedding_dim))
        w[p + "sgu_norm.gamma"] = q(1.0 + 0.1 * rng.randn(embedding_dim))
        w[p + "sgu_norm.beta"] = q(0.1 * rng.randn(embedding_dim))
        w[p + "spatial.kernel"] = glorot(rng, num_patches, num_patches)
        w[p + "spatial.bias"] = q(1.0 + 0.1 * rng.randn(num_patches))
        w[p + "proj_out.kernel"] = glorot(rng, embedding_dim, embedding_dim)
        w[p + "proj_out.bias"] = q(0.1 * rng.randn(embedding_dim))
        blk.normalize1.set_weights([w[p + "norm1.gamma"], w[p + "norm1.beta"]])
        blk.channel_projection1.layers[0].set_weights([w[p + "proj_in.kernel"], w[p + "proj_in.bias"]])
        blk.normalize2.set_weights([w[p + "sgu_norm.gamma"], w[p + "sgu_norm.beta"]])
        blk.spatial_projection.set_weights([w[p + "spatial.kernel"], w[p + "spatial.bias"]])
        blk.channel_projection2.set_weights([w[p + "proj_out.kernel"], w[p + "proj_out.bias"]])
    w["head.kernel"] = glorot(rng, embedding_dim, num_classes)
    w["head.bias"] = q(0.1 * rng.randn(num_classes))
    head.set_weights([w["head.kernel"], w["head.bias"]])
    check(sum(v.size for v in w.values()) == trainable, "every trainable weight was set and saved")
    check(
        sorted(int(np.prod(v.shape)) for v in model.trainable_weights) == sorted(v.size for v in w.values()),
        "saved weight shapes match the model's trainable weights",
    )

    images = rng.randint(0, 256, size=(8, 32, 32, 3)).astype(np.uint8)
    xf = tf.constant(images.astype(np.float32))
    logits = model(xf, training=False).numpy()
    logits_predict = model.predict(images, verbose=0)
    normalized = norm(xf).numpy()
    augmented = data_augmentation(xf, training=False).numpy()
    patches = patches_layer(tf.constant(augmented)).numpy()
    embedded = embed(tf.constant(patches)).numpy()
    block0 = gmlp_blocks.layers[0](tf.constant(embedded), training=False).numpy()
    features = gmlp_blocks(tf.constant(embedded), training=False).numpy()
    logits_manual = features.mean(axis=1) @ w["head.kernel"] + w["head.bias"]

    check(np.abs(logits - logits_predict).max() < 1e-5, "model(x, training=False) == model.predict(x)")
    check(
        np.array_equal(augmented, normalized),
        "inference data_augmentation == Normalization only (Resizing 32->32 exact)",
    )
    ref_norm = (images.astype(np.float32) - mean) / np.maximum(np.sqrt(var), 1e-7)
    check(np.abs(ref_norm - normalized).max() < 1e-5, "normalized = (x - mean) / max(sqrt(var), 1e-7)")
    ref_patches = normalized.reshape(8, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(8, 64, 48)
    check(np.array_equal(ref_patches, patches), "patches: row-major patch order, each flattened (row, col, channel)")
    check(np.abs(logits_manual - logits).max() < 1e-4, "logits = mean over tokens of features @ head + bias")

    # GELU of the add-on library: tanh approximation by default.
    t = np.linspace(-5, 5, 1001).astype(np.float32)
    g = tfa.layers.GELU()(tf.constant(t)).numpy().astype(np.float64)
    t64 = t.astype(np.float64)
    g_tanh = 0.5 * t64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (t64 + 0.044715 * t64**3)))
    from math import erf

    g_erf = np.array([0.5 * v * (1 + erf(v / np.sqrt(2))) for v in t64])
    print(f"  tfa GELU vs tanh formula {np.abs(g - g_tanh).max():.2e}, vs erf formula {np.abs(g - g_erf).max():.2e}")
    check(np.abs(g - g_tanh).max() < 1e-5 < np.abs(g - g_erf).max(), "tfa.layers.GELU() is the tanh approximation")

    print(f"  logits[0, :5] = {logits[0, :5]}; |logits| max {np.abs(logits).max():.3f}, std {logits.std():.3f}")
    arrays = dict(
        images=images,
        adapt_images=adapt_images,
        **{"norm.mean": mean, "norm.variance": var},
        **w,
        logits=logits.astype(np.float32),
        normalized=normalized.astype(np.float32),
        patches=patches.astype(np.float32),
        embedded=embedded.astype(np.float32),
        block0=block0.astype(np.float32),
        features=features.astype(np.float32),
        param_count=np.array(total, np.int64),
        trainable_count=np.array(trainable, np.int64),
        non_trainable_count=np.array(non_trainable, np.int64),
    )
    np.savez_compressed(os.path.join(out_dir, "forward.npz"), **arrays)


# ---------------------------------------------------------------------------------------------------------------------
# 2. zoom.npz
# ---------------------------------------------------------------------------------------------------------------------
def keras_zoom(images: np.ndarray, zooms: np.ndarray) -> np.ndarray:
    """Exactly what RandomZoom.call does once it has drawn `zooms` ([width/x zoom, height/y zoom] per image)."""
    x = tf.constant(images, tf.float32)
    shape = tf.shape(x)
    img_hd = tf.cast(shape[1], tf.float32)
    img_wd = tf.cast(shape[2], tf.float32)
    out = kip.transform(
        x,
        kip.get_zoom_matrix(tf.constant(zooms, tf.float32), img_hd, img_wd),
        fill_mode="reflect",
        fill_value=0.0,
        interpolation="bilinear",
    )
    return out.numpy()


def numpy_zoom(images: np.ndarray, zooms: np.ndarray) -> np.ndarray:
    """The SPEC's description: sample at (zx (x - cx) + cx, zy (y - cy) + cy), bilinear, reflect about the edge."""
    n, h, w, c = images.shape
    out = np.zeros_like(images, dtype=np.float64)

    def reflect(coord, size):
        # reflection about the pixel edges (-0.5, size - 0.5): d c b a | a b c d | d c b a, then clip to [0, size-1]
        period = 2 * size
        r = np.mod(coord + 0.5, period)
        r = np.where(r >= size, period - r, r) - 0.5
        return np.clip(r, 0, size - 1)

    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    for i in range(n):
        zx, zy = float(zooms[i, 0]), float(zooms[i, 1])
        sx = reflect(zx * (xs - (w - 1) / 2) + (w - 1) / 2, w)
        sy = reflect(zy * (ys - (h - 1) / 2) + (h - 1) / 2, h)
        x0 = np.floor(sx).astype(int)
        y0 = np.floor(sy).astype(int)
        x1 = np.minimum(x0 + 1, w - 1)
        y1 = np.minimum(y0 + 1, h - 1)
        fx = (sx - x0)[..., None]
        fy = (sy - y0)[..., None]
        img = images[i].astype(np.float64)
        top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
        bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
        out[i] = top * (1 - fy) + bot * fy
    return out


def gen_zoom(out_dir: str) -> None:
    header("zoom.npz: RandomZoom's transform with fixed factors")
    rng = np.random.RandomState(SEED + 1)
    images = rng.randint(0, 256, size=(6, 32, 32, 3)).astype(np.float32)
    zooms = np.array([[0.8, 1.2], [1.2, 0.8], [1.0, 1.0], [0.8, 0.8], [1.2, 1.2], [0.93, 1.11]], np.float32)
    zoomed = keras_zoom(images, zooms)
    images_rect = rng.randint(0, 256, size=(4, 24, 40, 3)).astype(np.float32)
    zooms_rect = np.array([[0.8, 1.2], [1.2, 0.8], [0.85, 0.85], [1.17, 1.06]], np.float32)
    zoomed_rect = keras_zoom(images_rect, zooms_rect)

    check(np.abs(zoomed[2] - images[2]).max() < 1e-4, "zoom (1, 1) is the identity")
    d1 = np.abs(numpy_zoom(images, zooms) - zoomed).max()
    d2 = np.abs(numpy_zoom(images_rect, zooms_rect) - zoomed_rect).max()
    print(f"  numpy model of SPEC's formula vs Keras: square {d1:.2e}, 24x40 {d2:.2e} (pixel values 0..255)")
    check(max(d1, d2) < 2e-3, "SPEC's zoom formula (centre (W-1)/2, bilinear, reflect about the edge) matches Keras")

    # Which factor is which, and which way a zoom > 1 goes: RandomZoom with degenerate ranges.
    def layer_zoom(img, hf, wf):
        layer = layers.RandomZoom(height_factor=hf, width_factor=wf, seed=1)
        return layer(tf.constant(img), training=True).numpy()

    one = images_rect[:1]
    a = layer_zoom(one, (0.2, 0.2), (0.0, 0.0))  # height zoom 1.2, width zoom 1.0
    b = keras_zoom(one, np.array([[1.0, 1.2]], np.float32))
    check(
        np.abs(a - b).max() < 1e-4,
        "RandomZoom(height_factor=(.2,.2), width_factor=(0,0)) == zooms [[1.0, 1.2]] (x first)",
    )
    a = layer_zoom(one, (-0.2, -0.2), (0.1, 0.1))  # height 0.8, width 1.1
    b = keras_zoom(one, np.array([[1.1, 0.8]], np.float32))
    check(np.abs(a - b).max() < 1e-4, "RandomZoom(height=(-.2,-.2), width=(.1,.1)) == zooms [[1.1, 0.8]]")

    sq = np.zeros((1, 32, 32, 1), np.float32)
    sq[:, 8:24, 8:24] = 1.0  # a 16x16 white square in the middle
    area = {z: float((keras_zoom(sq, np.array([[z, z]], np.float32)) > 0.5).sum()) for z in (0.8, 1.0, 1.2)}
    print(f"  white 16x16 square area after zoom z: {area}")
    check(area[1.2] < area[1.0] < area[0.8], "zoom > 1 shrinks the content (zooms out, shows more), < 1 enlarges it")

    # How RandomZoom(0.2, 0.2) draws: record the zooms it passes to get_zoom_matrix.
    seen = []
    orig = kip.get_zoom_matrix

    def spy(zs, h, w, name=None):
        seen.append(zs.numpy())
        return orig(zs, h, w, name=name)

    kip.get_zoom_matrix = spy
    try:
        tf.keras.utils.set_random_seed(SEED)
        layer = layers.RandomZoom(height_factor=0.2, width_factor=0.2)
        layer(tf.zeros((20000, 2, 2, 1)), training=True)
    finally:
        kip.get_zoom_matrix = orig
    zs = seen[0]
    print(
        f"  RandomZoom(0.2, 0.2) draws per image: zx in [{zs[:, 0].min():.4f}, {zs[:, 0].max():.4f}], "
        f"zy in [{zs[:, 1].min():.4f}, {zs[:, 1].max():.4f}], means {zs.mean(0)}, "
        f"corr(zx, zy) = {np.corrcoef(zs[:, 0], zs[:, 1])[0, 1]:+.4f}"
    )
    check(zs.shape == (20000, 2), "one [zx, zy] pair per image")
    check(zs.min() >= 0.8 and zs.max() < 1.2 and abs(zs.mean() - 1) < 0.005, "zx, zy ~ U(0.8, 1.2)")
    check(abs(np.corrcoef(zs[:, 0], zs[:, 1])[0, 1]) < 0.03, "zx and zy drawn independently")

    # RandomFlip('horizontal'): per image, p = 0.5
    flip = layers.RandomFlip("horizontal")
    img = np.tile(np.arange(2, dtype=np.float32).reshape(1, 1, 2, 1), (20000, 1, 1, 1))
    flipped = flip(tf.constant(img), training=True).numpy()[:, 0, 0, 0] == 1.0
    print(f"  RandomFlip('horizontal') flipped {flipped.mean():.4f} of 20000 images")
    check(abs(flipped.mean() - 0.5) < 0.02, "RandomFlip('horizontal') flips each image with p = 0.5")

    np.savez_compressed(
        os.path.join(out_dir, "zoom.npz"),
        images=images,
        zooms=zooms,
        zoomed=zoomed.astype(np.float32),
        images_rect=images_rect,
        zooms_rect=zooms_rect,
        zoomed_rect=zoomed_rect.astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------------------------------
# 3. adamw.npz
# ---------------------------------------------------------------------------------------------------------------------
def gen_adamw(out_dir: str) -> None:
    header("adamw.npz: tfa.optimizers.AdamW(0.003, weight_decay=1e-4), 4 steps, lr halved before step 3")
    rng = np.random.RandomState(SEED + 2)
    w0_init = rng.randn(5, 3).astype(np.float32)
    b0_init = (0.1 * rng.randn(3)).astype(np.float32)
    grads_w0 = rng.randn(4, 5, 3).astype(np.float32)
    grads_b0 = (0.5 * rng.randn(4, 3)).astype(np.float32)
    grads_b0[1, 2] = 0.0  # one zero gradient entry

    w0 = tf.Variable(w0_init, name="w0")
    b0 = tf.Variable(b0_init, name="b0")
    opt = tfa.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    print(
        f"  optimizer class {type(opt).__mro__[1:3]}, beta_1 {opt.beta_1}, beta_2 {opt.beta_2}, "
        f"epsilon {opt.epsilon}, amsgrad {opt.amsgrad}"
    )
    lr_per_step, wd_per_step, after_w0, after_b0 = [], [], [], []
    for s in range(4):
        if s == 2:  # what ReduceLROnPlateau does
            keras.backend.set_value(opt.lr, keras.backend.get_value(opt.lr) * 0.5)
        lr_per_step.append(float(keras.backend.get_value(opt.lr)))
        wd_per_step.append(float(keras.backend.get_value(opt.weight_decay)))
        opt.apply_gradients([(tf.constant(grads_w0[s]), w0), (tf.constant(grads_b0[s]), b0)])
        after_w0.append(w0.numpy().copy())
        after_b0.append(b0.numpy().copy())
    lr_per_step = np.array(lr_per_step, np.float32)
    after_w0 = np.stack(after_w0)
    after_b0 = np.stack(after_b0)
    print(f"  lr per step {lr_per_step.tolist()}, weight_decay per step {wd_per_step}")
    check(np.all(np.array(wd_per_step) == np.float32(1e-4)), "weight decay stays 1e-4 after the lr is halved")

    def spec_formula(p0, grads, lrs, decay_scaled_by_lr=False):
        p = p0.astype(np.float64)
        m = np.zeros_like(p)
        v = np.zeros_like(p)
        b1, b2, eps, wd = 0.9, 0.999, 1e-7, 1e-4
        out = []
        for t, (g, lr) in enumerate(zip(grads.astype(np.float64), lrs.astype(np.float64), strict=True), start=1):
            p = p * (1 - (lr * wd if decay_scaled_by_lr else wd))
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
            out.append(p.copy())
        return np.stack(out)

    dev = max(
        np.abs(spec_formula(w0_init, grads_w0, lr_per_step) - after_w0).max(),
        np.abs(spec_formula(b0_init, grads_b0, lr_per_step) - after_b0).max(),
    )
    dev_lr = max(
        np.abs(spec_formula(w0_init, grads_w0, lr_per_step, True) - after_w0).max(),
        np.abs(spec_formula(b0_init, grads_b0, lr_per_step, True) - after_b0).max(),
    )
    # The decay alone is a relative 1e-4 change: compare the two candidate formulas against that scale.
    print(f"  max |SPEC formula (decay w *= 1 - 1e-4, independent of lr) - tfa| = {dev:.3e}")
    print(f"  max |variant with decay scaled by lr (w *= 1 - lr*1e-4) - tfa|      = {dev_lr:.3e}")
    check(dev < 1e-6, "tfa AdamW == SPEC formula (decay first, not scaled by lr; Keras epsilon placement)")
    check(dev_lr > 10 * dev, "the lr-scaled decay variant is clearly further off")

    # Decay happens before the Adam update and uses the pre-update weight: a zero-gradient first step only decays.
    z = tf.Variable(np.array([2.0, -3.0], np.float32))
    opt2 = tfa.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    opt2.apply_gradients([(tf.zeros(2), z)])
    check(
        np.allclose(z.numpy(), np.array([2.0, -3.0]) * (1 - 1e-4), rtol=0, atol=1e-7),
        "zero gradient: only the decay w *= (1 - 1e-4) (Adam step 0 / (0 + eps) = 0)",
    )

    # In model.fit (train_step -> optimizer.minimize) every trainable variable is decayed, biases included.
    inp = layers.Input(shape=(2,))
    d = layers.Dense(1)
    m = keras.Model(inp, d(inp))
    m.compile(optimizer=tfa.optimizers.AdamW(learning_rate=0.0, weight_decay=weight_decay), loss="mse")
    d.set_weights([np.array([[1.0], [2.0]], np.float32), np.array([0.5], np.float32)])
    m.fit(np.ones((4, 2), np.float32), np.zeros((4, 1), np.float32), batch_size=4, epochs=1, verbose=0)
    kk, bb = d.get_weights()
    print(f"  fit with lr=0: kernel {kk.ravel().tolist()}, bias {bb.tolist()}")
    check(
        np.allclose(kk.ravel(), [1 - 1e-4, 2 * (1 - 1e-4)], atol=1e-7)
        and np.allclose(bb, [0.5 * (1 - 1e-4)], atol=1e-7),
        "model.fit decays kernels AND biases by (1 - 1e-4) per step even with lr = 0",
    )

    np.savez_compressed(
        os.path.join(out_dir, "adamw.npz"),
        w0=w0_init,
        b0=b0_init,
        grads_w0=grads_w0,
        grads_b0=grads_b0,
        lr_per_step=lr_per_step,
        after_w0=after_w0.astype(np.float32),
        after_b0=after_b0.astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------------------------------
# 4. callbacks.json
# ---------------------------------------------------------------------------------------------------------------------
def f32(x) -> float:
    """A float32 value as a Python float: Keras hands val_loss to the callbacks this way."""
    return float(np.float32(x))


def sequences() -> dict[str, tuple[str, list[float]]]:
    s: dict[str, tuple[str, list[float]]] = {}
    s["decreasing"] = ("steady decrease by 2^-6 every epoch", [f32(4.0 - e / 64) for e in range(100)])
    s["plateau_after_7"] = (
        "decreases until epoch 7, then exactly flat",
        [f32(4.0 - min(e, 7) / 16) for e in range(100)],
    )
    sub = [f32(3.0 - e / 16) for e in range(10)]
    for _ in range(12):
        sub.append(f32(sub[-1] - 2.0**-17))
    while len(sub) < 100:
        sub.append(sub[-1])
    s["sub_threshold_improvements"] = (
        "decrease until epoch 9, then 12 epochs each 2^-17 (7.6e-6) lower (12 x = 9.2e-5 < 1e-4 in total), then flat",
        sub,
    )
    ties = [f32(3.0 - e / 4) for e in range(4)]  # best 2.25 at epoch 3
    while len(ties) < 100:
        ties.append(f32(2.5) if len(ties) % 2 == 0 else ties[3])
    s["exact_ties"] = ("best 2.25 at epoch 3, then 2.5 and exact ties of 2.25 alternating", ties)
    for gap in (5, 6, 10, 11):
        s[f"improve_every_{gap}"] = (
            f"an improvement (by 2^-4) at epochs 0, {gap}, {2 * gap}, ...; in between 0.5 above the best",
            [f32(4.0 - (e // gap) / 16 + (0.0 if e % gap == 0 else 0.5)) for e in range(100)],
        )
    s["oscillating"] = (
        "2 + 0.25 sin(1.3 e) - 0.004 e, rounded to float32 (runs of up to 8 non-improving epochs)",
        [f32(2.0 + 0.25 * np.sin(1.3 * e) - 0.004 * e) for e in range(100)],
    )
    s["tiny_forever"] = ("4 - e * 2^-17: improves by 7.6e-6 every epoch", [f32(4.0 - e * 2.0**-17) for e in range(100)])
    s["tiny_forever_19_halvings"] = (
        "4 - e * 2^-20: improves by 9.5e-7 every epoch (9.4e-5 in all): the lr is halved 19 times, down to "
        "0.003 / 2^19 = 5.7e-9 (PyTorch's ReduceLROnPlateau needs eps=0 for the last halving)",
        [f32(4.0 - e * 2.0**-20) for e in range(100)],
    )
    rng = np.random.RandomState(SEED + 3)
    walk = [3.0]
    for _ in range(99):
        walk.append(walk[-1] + rng.normal(-0.004, 0.03))
    s["random_walk"] = (
        "seeded random walk from 3.0, steps N(-0.004, 0.03), rounded to float32",
        [f32(v) for v in walk],
    )
    s["never_improves"] = (
        "best at epoch 0, every later epoch higher",
        [f32(2.0 + (0.0 if e == 0 else 1.0)) for e in range(100)],
    )
    s["u_shape"] = ("decreases until epoch 30, then rises", [f32(2.0 + abs(e - 30) / 32) for e in range(100)])
    s["late_best_no_stop"] = (
        "decreases until epoch 91, flat afterwards: 8 non-improving epochs, budget runs out before patience",
        [f32(4.0 - min(e, 91) / 64) for e in range(100)],
    )
    return s


class Scripted(keras.callbacks.Callback):
    """First in the list: replaces val_loss with the scripted value and marks the weights with the epoch index."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"] = self.seq[epoch]
        self.model.layers[-1].kernel.assign(np.full((1, 1), float(epoch), np.float32))


class Recorder(keras.callbacks.Callback):
    """Last in the list: the lr in effect for the next epoch, and the weights at the end."""

    def __init__(self):
        super().__init__()
        self.lrs: list[float] = []
        self.final_kernel = None

    def on_epoch_end(self, epoch, logs=None):
        self.lrs.append(float(keras.backend.get_value(self.model.optimizer.lr)))

    def on_train_end(self, logs=None):
        self.final_kernel = float(self.model.layers[-1].kernel.numpy().ravel()[0])


def simulate_spec(seq):
    """SPEC.md's rules, written independently, to compare with the real callbacks."""
    lr = f32(0.003)
    best_es, wait_es, best_ep = np.inf, 0, 0
    best_rl, wait_rl = np.inf, 0
    lrs, weights, stopped = [], None, None
    for e, v in enumerate(seq):
        if v < best_es:
            best_es, wait_es, best_ep = v, 0, e
        else:
            wait_es += 1
        stop = wait_es >= 10
        if v < best_rl - 1e-4:
            best_rl, wait_rl = v, 0
        else:
            wait_rl += 1
            if wait_rl >= 5:
                lr, wait_rl = f32(lr * 0.5), 0
        lrs.append(lr)
        if stop:
            stopped, weights = e, best_ep
            break
    if stopped is None:
        weights = len(seq) - 1
    return lrs, stopped, weights


def gen_callbacks(out_dir: str) -> None:
    header("callbacks.json: EarlyStopping(patience=10, restore_best_weights=True), ReduceLROnPlateau(0.5, 5)")
    x = np.zeros((4, 1), np.float32)
    y = np.zeros((4, 1), np.float32)
    results = {}
    for name, (desc, seq) in sequences().items():
        tf.keras.utils.set_random_seed(SEED)
        inp = layers.Input(shape=(1,))
        model = keras.Model(inp, layers.Dense(1, use_bias=False)(inp))
        model.compile(optimizer=make_optimizer(), loss="mse")
        reduce_lr = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=5)
        early_stopping = tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True)
        rec = Recorder()
        hist = model.fit(
            x,
            y,
            batch_size=4,
            epochs=len(seq),
            validation_data=(x, y),
            callbacks=[Scripted(seq), early_stopping, reduce_lr, rec],
            verbose=0,
        )
        n_run = len(hist.epoch)
        stopped = n_run - 1 if model.stop_training else None
        if stopped is not None:
            assert early_stopping.stopped_epoch == stopped
        weights_epoch = int(round(rec.final_kernel))
        assert rec.final_kernel == weights_epoch
        results[name] = dict(
            description=desc,
            val_loss=seq[:n_run],
            lr_after_epoch=rec.lrs,
            stopped_epoch=stopped,
            weights_epoch=weights_epoch,
            best_epoch=int(early_stopping.best_epoch),
        )
        halvings = [e for e in range(n_run) if rec.lrs[e] != (rec.lrs[e - 1] if e else f32(0.003))]
        print(
            f"  {name:28s} epochs run {n_run:3d}  stopped {str(stopped):>4s}  weights of epoch {weights_epoch:3d}  "
            f"final lr {rec.lrs[-1]:.6g}  lr halved after epochs {halvings}"
        )
        lrs_s, stopped_s, weights_s = simulate_spec(seq)
        check(
            (lrs_s, stopped_s, weights_s) == (rec.lrs, stopped, weights_epoch),
            f"{name}: SPEC's stated rules give the same decisions",
        )
    doc = dict(
        generator="tools/keras_reference/generate.py",
        versions=dict(tensorflow=tf.__version__, keras=KERAS_VERSION, tensorflow_addons=tfa.__version__),
        setup=(
            "callbacks=[early_stopping, reduce_lr] as in the tutorial; EarlyStopping(monitor='val_loss', patience=10, "
            "restore_best_weights=True), ReduceLROnPlateau(monitor='val_loss', factor=0.5, patience=5); "
            "optimizer tfa AdamW(lr=0.003, weight_decay=1e-4); driven by model.fit for len(val_loss) epochs; "
            "val_loss values are float32 numbers written as exact Python floats"
        ),
        initial_lr=f32(0.003),
        epochs_budget=100,
        sequences=results,
    )
    with open(os.path.join(out_dir, "callbacks.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")


def main(argv: list[str]) -> int:
    out_dir = argv[1] if len(argv) > 1 else os.path.join("tests", "fixtures", "keras")
    os.makedirs(out_dir, exist_ok=True)
    print(f"TensorFlow {tf.__version__}, Keras {KERAS_VERSION}, TF-Addons {tfa.__version__}, NumPy {np.__version__}")
    if not KERAS_VERSION.startswith("2.15"):
        print("this generator needs Keras 2.15 (tf.keras), not Keras 3")
        return 2
    gen_forward(out_dir)
    gen_zoom(out_dir)
    gen_adamw(out_dir)
    gen_callbacks(out_dir)
    header("files")
    for f in sorted(os.listdir(out_dir)):
        print(f"  {f:16s} {os.path.getsize(os.path.join(out_dir, f)):>9,d} bytes")
    if FAILURES:
        print(f"\n{len(FAILURES)} check(s) FAILED:")
        for f in FAILURES:
            print("  -", f)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
