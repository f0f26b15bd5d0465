"""--flip-mode alternate: each training image mirrored in every other epoch (airbench's alternating flip)."""

import pytest
import torch

from gmlp_vision.augment import augment_for_training
from gmlp_vision.batches import BatchSource, alternating_flips, flip_halves
from gmlp_vision.config import from_preset
from gmlp_vision.errors import ConfigError
from gmlp_vision.graphs import unsupported
from gmlp_vision.step import EagerStep
from gmlp_vision.train import train
from synthetic import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def asymmetric_source(n, batch_size, **kw):
    """``n`` 1x2 images ``[i, 255 - i]``: a mirrored image reads ``[255 - i, i]``."""
    i = torch.arange(n, dtype=torch.uint8)
    images = torch.stack([i, 255 - i], dim=-1)[:, None, None, :]  # (n, 1, 1, 2)
    return BatchSource(images, torch.arange(n), batch_size, **kw)


def mirrored_in_epoch(source, epoch, *, batch=0):
    """{image index: mirrored?} over the rest of ``epoch``'s batches, from batch ``batch`` on."""
    progress = source.new_epoch(torch.Generator().manual_seed(epoch), step=epoch * source.steps_per_epoch + batch)
    progress.batch = batch
    seen = {}
    for b in source.batches(progress):
        first = b.images[:, 0, 0, 0].long()
        assert torch.equal(torch.where(first < 128, first, 255 - first), b.index)  # the images at the indices
        seen.update(zip(b.index.tolist(), (first != b.index).tolist(), strict=True))
    return seen


def test_each_image_is_mirrored_in_every_other_epoch_starting_from_a_random_half():
    source = asymmetric_source(100, 16, flip_seed=5)
    epochs = [mirrored_in_epoch(source, e) for e in range(4)]
    first = torch.tensor([epochs[0][i] for i in range(100)])
    assert 35 <= int(first.sum()) <= 65  # a random half, not all or none
    for e, seen in enumerate(epochs):
        assert [seen[i] for i in range(100)] == [bool(f) ^ (e % 2 == 1) for f in first.tolist()]
    other = mirrored_in_epoch(asymmetric_source(100, 16, flip_seed=6), 0)
    assert [other[i] for i in range(100)] != first.tolist()  # the seed picks the half
    resumed = mirrored_in_epoch(source, 3, batch=2)  # a resumed epoch mirrors as the uninterrupted one did
    assert len(resumed) == 100 - 2 * 16 and all(epochs[3][i] == m for i, m in resumed.items())
    plain = mirrored_in_epoch(asymmetric_source(100, 16), 1)  # no flip seed: the images come as they are
    assert not any(plain.values())


def test_the_halves_and_the_flips_are_pure_functions_of_seed_index_and_epoch():
    halves = flip_halves(1000, 0)
    assert torch.equal(halves, flip_halves(1000, 0)) and 400 < int(halves.sum()) < 600
    index = torch.tensor([3, 3, 999, 0])  # an image drawn twice (balanced sampler) is mirrored the same both times
    assert torch.equal(alternating_flips(halves, index, 0), halves[index])
    assert torch.equal(alternating_flips(halves, index, 7), ~halves[index])


def test_the_step_leaves_alternating_flips_to_the_batch_source():
    x = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 255
    for mode, untouched in (("alternate", True), ("random", False)):
        aug = from_preset("tiny", flip=True, flip_mode=mode, zoom=0.0, crop="none").augment
        out = augment_for_training(x, aug, torch.Generator().manual_seed(1))
        assert torch.equal(out, x) == untouched


def test_a_captured_cuda_step_says_why_it_falls_back_to_eager_steps():
    cfg = from_preset("tiny", flip_mode="alternate", precision="fp32")
    why = unsupported(cfg, torch.device("cuda"), distributed=False, streamed=False)
    assert why is not None and "--flip-mode alternate" in why
    plain = unsupported(cfg.replace(flip=False), torch.device("cuda"), distributed=False, streamed=False)
    assert "--flip-mode" not in str(plain)


def test_training_sees_the_run_seeds_halves_mirrored_epoch_by_epoch(tmp_path, monkeypatch):
    seen = []
    original = EagerStep.step

    def recording(self, batch):
        seen.append((batch.index.clone(), batch.images.clone()))
        return original(self, batch)

    monkeypatch.setattr(EagerStep, "step", recording)
    ds = make_dataset(n_train=48, n_test=8)
    cfg = from_preset(
        "tiny", epochs=2, progress=False, out=str(tmp_path / "run"), flip_mode="alternate", seed=3, val_split=0.0
    )
    train(cfg, ds)
    halves, steps = flip_halves(48, 3), len(seen) // 2
    for n, (index, images) in enumerate(seen):
        flips = halves[index] ^ (n >= steps)
        expected = ds.train.images[index]
        assert torch.equal(images, torch.where(flips[:, None, None, None], expected.flip(-1), expected))
    saved = (tmp_path / "run" / "config.json").read_text()
    assert '"flip_mode": "alternate"' in saved


def test_an_unknown_flip_mode_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="flip.mode"):
        from_preset("tiny", flip_mode="sideways")
