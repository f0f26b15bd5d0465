"""Fixtures: small fake CIFAR archives in the official format (see archives.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from archives import FakeCifar, make_cifar, write_tar


@pytest.fixture
def fake_cifar10() -> FakeCifar:
    """Fake CIFAR-10: 5 batches of 20 training images, 10 test images."""
    return make_cifar("cifar10")


@pytest.fixture
def fake_cifar100() -> FakeCifar:
    """Fake CIFAR-100: 100 training images (one per class), 10 test images."""
    return make_cifar("cifar100")


@pytest.fixture
def cifar10_archive(tmp_path: Path, fake_cifar10: FakeCifar) -> Path:
    """``fake_cifar10`` written as ``cifar-10-python.tar.gz`` under ``tmp_path``."""
    return write_tar(tmp_path / fake_cifar10.archive, fake_cifar10.files())


@pytest.fixture
def cifar100_archive(tmp_path: Path, fake_cifar100: FakeCifar) -> Path:
    """``fake_cifar100`` written as ``cifar-100-python.tar.gz`` under ``tmp_path``."""
    return write_tar(tmp_path / fake_cifar100.archive, fake_cifar100.files())


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread: on a busy 2-core machine, 2 OpenMP threads can stall a tiny model's steps 10-100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # what train(threads=0) then runs with (gmlp_vision.cpu), too
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished one-epoch `tiny` run on synthetic images, trained once for the tests that only read it."""
    from gmlp_vision.config import from_preset
    from gmlp_vision.train import train
    from synthetic import make_dataset

    out = tmp_path_factory.mktemp("tiny") / "run"
    return train(from_preset("tiny", epochs=1, progress=False, out=str(out), threads=1), make_dataset()).run_dir
