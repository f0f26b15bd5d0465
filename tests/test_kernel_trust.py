"""The fused kernels' cache is trusted before anything in it is loaded: planted, damaged and wrong builds.

A planted or truncated library would run or crash inside the process that loads it, so those cases run ``gmlp
predict`` in a child process and look at what it left: the planted library's constructor writes a marker file when
it runs, and the test asserts the marker is absent.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmlp_vision import fused, fused_check, kernel_cache
from gmlp_vision.cli import main
from gmlp_vision.errors import DamagedLibrary

pytestmark = pytest.mark.usefixtures("one_thread")

CC = shutil.which("cc") or shutil.which("gcc")
if CC is None:
    pytest.skip("no C compiler here: the model uses the PyTorch path", allow_module_level=True)

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("PLANTED_MARKER");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    return tiny_run  # read only here: the session's one tiny run


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "a.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(path)
    return path


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """A fresh XDG cache for this test (and the library loaded from it, forgotten after)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(fused, "_WARNED", set())  # a process warns once about its private folder: this test's process
    fused.library.cache_clear()
    yield tmp_path / "xdg"
    fused.library.cache_clear()


def kernel_name() -> str:
    """The file name `fused.build` gives the library here (the same for every cache directory)."""
    return fused.build().name


def plant(directory: Path, name: str, tmp_path: Path) -> Path:
    """Compile the marker-writing library as ``directory/name`` with a matching digest beside it."""
    source = tmp_path / "planted.c"
    source.write_text(PLANTED)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    subprocess.run([CC, "-shared", "-fPIC", str(source), "-o", str(target)], check=True)
    target.with_name(name + ".sha256").write_text(_sha(target) + "\n")
    return target


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def predict(run: Path, image: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    command = [sys.executable, "-m", "gmlp_vision", "predict", str(run), str(image), "--json"]
    return subprocess.run(command, capture_output=True, text=True, env=full, timeout=120)


def predict_here(run: Path, image: Path, capsys) -> subprocess.CompletedProcess:
    """``gmlp predict --json`` in this process, with the kernels loaded afresh (the environment as the test set it).

    Safe where nothing can crash the process: a planted library here only writes its marker file.
    """
    fused.library.cache_clear()
    code = main(["predict", str(run), str(image), "--json"])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([], code, out, err)


def assert_clean_prediction(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    first = done.stdout.splitlines()[0]
    assert json.loads(first)["image"].endswith("a.png")


def test_a_library_planted_in_a_world_writable_cache_never_runs(run, image, cache, tmp_path):
    name = kernel_name()
    kernels = cache / "gmlp-vision" / "kernels"
    planted = plant(kernels, name, tmp_path)
    kernels.chmod(0o777)
    before = sorted((p.name, p.read_bytes()) for p in kernels.iterdir())
    marker, private = tmp_path / "marker", tmp_path / "tmp"
    private.mkdir()
    done = predict(run, image, {"XDG_CACHE_HOME": str(cache), "PLANTED_MARKER": str(marker), "TMPDIR": str(private)})
    assert_clean_prediction(done)
    assert not marker.exists(), "the planted library's constructor ran"
    assert f"not using the cache: {kernels} is writable by group or others (mode 0o777)" in done.stderr
    assert done.stderr.count("\n") == 1  # one warning line
    assert sorted((p.name, p.read_bytes()) for p in kernels.iterdir()) == before and planted.is_file()
    assert not list(private.iterdir())  # the private build folder is gone with the process


def test_a_cache_through_a_symlink_to_a_sticky_world_writable_folder_is_not_used(
    run, image, cache, tmp_path, monkeypatch, capsys
):
    name = kernel_name()
    world = tmp_path / "world"
    world.mkdir()
    world.chmod(0o1777)
    (cache / "gmlp-vision").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache / "gmlp-vision" / "kernels", ignore_errors=True)
    (cache / "gmlp-vision" / "kernels").symlink_to(world)
    plant(world, name, tmp_path)
    marker = tmp_path / "marker"
    monkeypatch.setenv("PLANTED_MARKER", str(marker))
    done = predict_here(run, image, capsys)
    assert_clean_prediction(done)
    assert not marker.exists(), "the planted library's constructor ran"
    assert f"{world} is writable by group or others (mode 0o1777)" in done.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a folder away needs root")
def test_a_cache_owned_by_another_user_is_not_used(run, image, cache, tmp_path, monkeypatch, capsys):
    name = kernel_name()
    kernels = cache / "gmlp-vision" / "kernels"
    plant(kernels, name, tmp_path)
    for path in (kernels, *kernels.iterdir()):
        os.chown(path, 65534, 65534)
    marker = tmp_path / "marker"
    monkeypatch.setenv("PLANTED_MARKER", str(marker))
    done = predict_here(run, image, capsys)
    assert_clean_prediction(done)
    assert not marker.exists()
    assert "is owned by another user (uid 65534)" in done.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a symlink away needs root")
def test_a_symlink_owned_by_another_user_is_not_followed(cache, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (cache / "gmlp-vision").mkdir(parents=True)
    link = cache / "gmlp-vision" / "kernels"
    link.symlink_to(mine)
    os.lchown(link, 65534, 65534)
    assert kernel_cache.untrusted(link) == f"{link} is a symlink owned by another user (uid 65534)"
    assert fused.build().parent != link


def test_a_library_without_its_recorded_digest_is_built_again_not_loaded(
    run, image, cache, tmp_path, monkeypatch, capsys
):
    name = kernel_name()
    kernels = cache / "gmlp-vision" / "kernels"
    planted = plant(kernels, name, tmp_path)
    (kernels / f"{name}.sha256").unlink()  # planted where we may write, but not built by us
    marker = tmp_path / "marker"
    monkeypatch.setenv("PLANTED_MARKER", str(marker))
    done = predict_here(run, image, capsys)
    assert_clean_prediction(done)
    assert not marker.exists()
    assert planted.read_bytes()[:4] == b"\x7fELF" and _sha(planted) == (kernels / f"{name}.sha256").read_text().strip()


def test_a_truncated_cached_library_is_rebuilt_not_mapped(run, image, cache, tmp_path):
    path = fused.build()
    whole = path.read_bytes()
    path.write_bytes(whole[:1000])  # mapped, this killed predict and evaluate with SIGBUS (exit 135)
    done = predict(run, image, {"XDG_CACHE_HOME": str(cache)})
    assert_clean_prediction(done)
    assert path.read_bytes() == whole and done.stderr == ""  # rebuilt quietly: the cache is usable


def test_warnings_go_to_stderr_so_json_stays_json(run, image, cache, tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache should be: nothing can be created under it")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    done = predict_here(run, image, capsys)
    assert_clean_prediction(done)
    assert done.stderr.count("\n") == 1 and "fused CPU kernels unavailable, using the PyTorch path" in done.stderr
    monkeypatch.delenv("CC")
    done = predict_here(run, image, capsys)  # a compiler, but no cache: a private build
    assert_clean_prediction(done)
    assert "cannot write to" in done.stderr and "building in" in done.stderr and "Traceback" not in done.stderr


def test_an_unterminated_cc_is_one_warning(monkeypatch, cache, caplog):
    monkeypatch.setenv("CC", '"unterminated')
    with caplog.at_level(logging.WARNING, logger="gmlp_vision.fused"):
        assert fused.library() is None
    assert "cannot read the compiler command $CC='\"unterminated'" in caplog.text
    h = torch.randn(20_000)
    assert 0.45 < (fused.gelu_dropout(h, "none", 0.5) == 0).float().mean() < 0.55  # the PyTorch path drops


BROKEN_DROPOUT = ("kept(base + c, seed, threshold)) ? g * scale", "1) ? g * scale")


def never_drops(tmp_path: Path) -> Path:
    """fused.c with a forward dropout that keeps everything: it compiles, loads and computes GELU right."""
    text = fused.SOURCE.read_text()
    assert BROKEN_DROPOUT[0] in text
    source = tmp_path / "fused.c"
    source.write_text(text.replace(*BROKEN_DROPOUT))
    return source


def test_a_cached_build_that_never_drops_fails_the_check_and_is_rebuilt(monkeypatch, cache, tmp_path, caplog):
    path = fused.build()
    broken = never_drops(tmp_path)
    command = kernel_cache.compiler_command(None)
    kernel_cache.compile_library(command, broken, fused.FLAGS, path, again=True)  # with its digest: loadable
    lib = fused._load(path)
    with pytest.raises(DamagedLibrary, match="disagrees with PyTorch's GELU with dropout 0.5"):
        fused_check.self_check(lib)
    with caplog.at_level(logging.WARNING, logger="gmlp_vision.fused"):
        assert fused.library() is not None
    assert caplog.text == ""
    h = torch.randn(20_000)
    assert 0.45 < (fused.gelu_dropout(h, "none", 0.5) == 0).float().mean() < 0.55


def test_when_every_build_fails_the_check_dropout_still_drops(monkeypatch, cache, tmp_path, caplog):
    monkeypatch.setattr(fused, "SOURCE", never_drops(tmp_path))
    with caplog.at_level(logging.WARNING, logger="gmlp_vision.fused"):
        assert fused.library() is None and not fused.applies(torch.zeros(4))
    assert caplog.text.count("fused CPU kernels unavailable") == 1 and "with dropout 0.5" in caplog.text
    h = torch.randn(20_000, requires_grad=True)
    out = fused.gelu_dropout(h, "none", 0.5)
    assert 0.45 < (out == 0).float().mean() < 0.55
    out.sum().backward()
    assert torch.equal(h.grad == 0, out == 0)
