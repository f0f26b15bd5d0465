"""How `gmlp export` writes: unique temp files, the usual permissions, and one-line errors for where it cannot write.

Every failure must leave the target as it was: no temp file, no half-written export, no folder made for nothing.
Tests run as root (here and in CI), where a folder's 0o555 does not stop a write, so a read-only file system is
simulated at the system-call layer (`os.open`, `os.mkdir`) with pytest's monkeypatch.
"""

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest
import safetensors

from gmlp_vision.cli import main
from gmlp_vision.config import from_preset
from gmlp_vision.errors import ExportError
from gmlp_vision.export import export_onnx, export_safetensors
from gmlp_vision.files import write_text
from gmlp_vision.train import train
from synthetic import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

ONNX_REASON = "the onnx extra is not installed (pip install 'gmlp-vision[onnx]'); CI installs it"


def needs_onnx() -> None:
    pytest.importorskip("onnx", reason=ONNX_REASON)
    pytest.importorskip("onnxruntime", reason=ONNX_REASON)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("writes") / "run"
    return train(from_preset("tiny", epochs=1, progress=False, out=str(out)), make_dataset()).run_dir


def everything(folder: Path) -> list[str]:
    """Every path under ``folder`` (hidden ones included), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def no_temps(folder: Path) -> None:
    left = [name for name in everything(folder) if name.endswith(".tmp") or Path(name).name.startswith(".")]
    assert not left, left


def read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make creating any file or folder under ``root`` fail as on a read-only mount (EROFS), as root too."""
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path: object) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(root)

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    return code, err.strip()


# --- unique temp names, permissions --------------------------------------------------------------------------------


def test_temp_names_are_unique_per_call(run, tmp_path, monkeypatch):
    needs_onnx()
    out = tmp_path / "out"
    out.mkdir()
    for old in (".model.onnx.tmp", ".model.onnx.export.tmp", ".model.onnx.quant.tmp", ".config.json.tmp"):
        (out / old).mkdir()  # the fixed temp names of old: another export's file there must not be touched
    renamed: list[str] = []
    real_replace = os.replace

    def spy(src, dst):
        renamed.append(Path(src).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    for _ in range(2):
        assert main(["export", str(run), "--out", str(out / "model.onnx"), "--quantize", "int8"]) == 0
        assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert len(renamed) == len(set(renamed)) == 2 * 6  # model, int8, card; weights, config, card: each its own temp
    assert all(name.startswith(".") and name.endswith(".tmp") for name in renamed)
    names = [n for n in everything(out) if not n.startswith(".")]
    assert names == ["README.md", "config.json", "model.int8.onnx", "model.onnx", "model.safetensors"]
    assert sorted(n for n in everything(out) if n.startswith(".")) == [  # the old names, untouched
        ".config.json.tmp",
        ".model.onnx.export.tmp",
        ".model.onnx.quant.tmp",
        ".model.onnx.tmp",
    ]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_exports_get_the_usual_permissions(run, tmp_path, capsys, umask, mode):
    needs_onnx()
    old = os.umask(umask)
    try:
        assert main(["export", str(run), "--out", str(tmp_path / "model.onnx"), "--quantize", "int8"]) == 0
        assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path)]) == 0
        write_text(tmp_path / "notes.txt", "text\n")
    finally:
        os.umask(old)
    for name in ("model.onnx", "model.int8.onnx", "model.safetensors", "config.json", "README.md", "notes.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name  # not mkstemp's 0600
    no_temps(tmp_path)


# --- where an export cannot be written ----------------------------------------------------------------------------


def test_safetensors_out_is_an_existing_file(run, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine")
    code, err = run_cli(["export", str(run), "--format", "safetensors", "--out", str(target)], capsys)
    assert code == 1
    assert err == (
        f"gmlp: error: cannot export to {target}: it is a file, and safetensors go in a folder; "
        "export elsewhere with --out"
    )
    assert target.read_text() == "mine" and everything(tmp_path) == ["taken"]


def test_onnx_out_below_a_file(run, tmp_path, capsys):
    needs_onnx()
    (tmp_path / "taken").write_text("mine")
    code, err = run_cli(["export", str(run), "--out", str(tmp_path / "taken" / "sub" / "m.onnx")], capsys)
    assert code == 1
    assert f"cannot write {tmp_path / 'taken' / 'sub' / 'm.onnx'}: {tmp_path / 'taken'} is a file, not a folder" in err
    assert "export elsewhere with --out" in err
    assert everything(tmp_path) == ["taken"]


def test_onnx_out_is_an_existing_folder(run, tmp_path, capsys):
    needs_onnx()
    code, err = run_cli(["export", str(run), "--out", str(tmp_path)], capsys)
    assert code == 1
    suggestion = tmp_path / "model.onnx"
    assert err == f"gmlp: error: cannot export to {tmp_path}: it is a folder; name a file in it: --out {suggestion}"
    assert everything(tmp_path) == []


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_read_only_file_system(run, tmp_path, capsys, monkeypatch, fmt):
    if fmt == "onnx":
        needs_onnx()
    ro = tmp_path / "ro"
    (ro / "export").mkdir(parents=True)
    (ro / "export" / "model.onnx").write_text("an older export")
    read_only(monkeypatch, ro)
    for out in (ro / "export", ro / "new" / "export"):  # an existing folder, and one to create
        target = out / ("model.onnx" if fmt == "onnx" else "model.safetensors")
        argv = ["export", str(run), "--format", fmt, "--out", str(target if fmt == "onnx" else out)]
        code, err = run_cli(argv, capsys)
        assert code == 1
        folder = out if out.exists() else ro
        assert err == (
            f"gmlp: error: cannot write {target}: {folder} is on a read-only file system; export elsewhere with --out"
        )
    monkeypatch.undo()
    assert everything(ro) == ["export", "export/model.onnx"]
    assert (ro / "export" / "model.onnx").read_text() == "an older export"


@pytest.mark.parametrize(
    ("options", "reason"),
    [("ro,size=1m", "{mount} is on a read-only file system"), ("size=40k", "no space left in {mount} (disk")],
)
def test_a_real_read_only_or_full_file_system(run, tmp_path, capsys, options, reason):
    """A real tmpfs, read-only or too small for the export (root only; skipped where it cannot be mounted)."""
    needs_onnx()
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        for argv in (
            ["--out", str(mount / "export" / "model.onnx"), "--quantize", "int8"],
            ["--format", "safetensors", "--out", str(mount / "export")],
        ):
            code, err = run_cli(["export", str(run), *argv], capsys)
            assert code == 1 and reason.format(mount=mount) in err and err.endswith("elsewhere with --out"), err
            assert everything(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_read_only_run_directory_names_out(run, capsys, monkeypatch):
    """The default export folder is inside the run directory: on a read-only one, the message says to use --out."""
    needs_onnx()
    before = everything(run)
    read_only(monkeypatch, run)
    code, err = run_cli(["export", str(run)], capsys)
    assert code == 1
    assert err == (
        f"gmlp: error: cannot write {run / 'export' / 'model.onnx'}: {run} is on a read-only file system; "
        "export elsewhere with --out"
    )
    monkeypatch.undo()
    assert everything(run) == before


def test_full_disk_keeps_the_old_export_whole(run, tmp_path, capsys, monkeypatch):
    needs_onnx()
    import onnx

    old = tmp_path / "model.onnx"
    old.write_bytes(b"the previous export")

    def half_then_full(proto, path, *args, **kwargs):
        Path(path).write_bytes(b"half a graph")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(onnx, "save", half_then_full)
    code, err = run_cli(["export", str(run), "--out", str(old)], capsys)
    assert code == 1
    assert err == (
        f"gmlp: error: cannot write {old}: no space left in {tmp_path} (disk or quota full); free some space, or "
        "export elsewhere with --out"
    )
    assert old.read_bytes() == b"the previous export" and everything(tmp_path) == ["model.onnx"]


def test_full_disk_in_safetensors_leaves_no_folder(run, tmp_path, capsys, monkeypatch):
    """safetensors reports a failed write as its own error, "(os error 28)": it is a full disk, said so."""

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("gmlp_vision.export.save_file", full)
    out = tmp_path / "a" / "b"
    with pytest.raises(ExportError, match=r"no space left in .*; free some space"):
        export_safetensors(run, out)
    assert everything(tmp_path) == []  # the folders it made for the export are gone too


def test_interrupt_leaves_no_temp(run, tmp_path, monkeypatch):
    needs_onnx()
    import onnx

    def interrupted(proto, path, *args, **kwargs):
        Path(path).write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(run, tmp_path / "m.onnx")
    assert everything(tmp_path) == []


def test_card_that_cannot_be_written(run, tmp_path, capsys, monkeypatch):
    real_replace = os.replace

    def full_for_the_card(src, dst):
        if Path(dst).name == "README.md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_for_the_card)
    code, err = run_cli(["export", str(run), "--format", "safetensors", "--out", str(tmp_path)], capsys)
    assert code == 1
    assert err.startswith(f"gmlp: error: cannot write {tmp_path / 'README.md'}: no space left in {tmp_path}")
    assert everything(tmp_path) == ["config.json", "model.safetensors"]  # each whole; no temp


def test_write_text_replaces_whole(tmp_path):
    path = tmp_path / "f.json"
    (tmp_path / ".f.json.tmp").mkdir()  # the old fixed temp name, taken
    write_text(path, "one\n")
    write_text(path, "two\n")
    assert path.read_text() == "two\n"
    assert everything(tmp_path) == [".f.json.tmp", "f.json"]
    with pytest.raises(TypeError):
        write_text(path, 3)  # type: ignore[arg-type]  # fails while writing: the old content stays, no temp
    assert path.read_text() == "two\n" and everything(tmp_path) == [".f.json.tmp", "f.json"]
