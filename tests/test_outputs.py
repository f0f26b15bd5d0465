"""Predictions out: `gmlp predict --output` tables (CSV, TSV, JSON lines, parquet), `--skip-bad-images`, and every
command quiet with exit 0 when its standard output is closed early (``| head``)."""

import csv
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gmlp_vision import files
from gmlp_vision.cli import main
from gmlp_vision.errors import ImageError
from gmlp_vision.outputs import columns, open_predictions
from gmlp_vision.predict import Classifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clf(tiny_run) -> Classifier:
    return Classifier.from_checkpoint(tiny_run)


@pytest.fixture
def photos(tmp_path) -> Path:
    """Three readable PNGs and one file that is no image, in one folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"this is not a png")
    return folder


def test_skip_bad_gives_an_error_prediction_in_place_and_the_others_unchanged(clf, photos):
    files = sorted(photos.iterdir())
    with pytest.raises(ImageError, match="broken.png"):
        clf.predict(files)
    preds = clf.predict(files, top_k=2, skip_bad=True)
    assert [Path(p.source).name for p in preds] == ["0.png", "1.png", "2.png", "broken.png"]
    assert preds[3].top_k == () and "broken.png" in preds[3].error
    alone = clf.predict([f for f in files if f.name != "broken.png"], top_k=2)
    assert preds[:3] == alone  # the bad file changes nothing for the others (batches of any make-up)
    assert preds[3].to_dict() == {"image": str(files[3]), "error": preds[3].error}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_output_tables_hold_one_row_per_file_with_path_first(tiny_run, clf, photos, tmp_path, capsys, suffix):
    out = tmp_path / f"preds{suffix}"
    argv = ["predict", str(tiny_run), str(photos), "--top-k", "3", "--output", str(out), "--skip-bad-images"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == f"4 predictions written to {out}, 1 unreadable (see the error column)\n"
    assert captured.err.count("gmlp: skipped: ") == 1 and "broken.png" in captured.err
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        header, rows = table.column_names, table.to_pylist()
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        header = list(rows[0])
    else:
        with open(out, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows, header = list(reader), reader.fieldnames
    assert header == columns(3) == ["path", "class_1", "probability_1", "class_2", "probability_2", "class_3",
                                    "probability_3", "error"]  # fmt: skip
    assert [Path(r["path"]).name for r in rows] == ["0.png", "1.png", "2.png", "broken.png"]
    expected = clf.predict(sorted(photos.glob("[0-9].png")), top_k=3)
    for row, pred in zip(rows, expected, strict=False):
        assert [row[f"class_{k}"] for k in (1, 2, 3)] == [s.name for s in pred.top_k]
        assert [float(row[f"probability_{k}"]) for k in (1, 2, 3)] == pytest.approx([s.probability for s in pred.top_k])
        assert row["error"] in ("", None)
    assert "broken.png" in rows[3]["error"] and rows[3]["class_1"] in ("", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["photos", out.name])  # no temp file left


def test_a_bad_file_without_the_flag_stops_with_one_line_and_writes_nothing(tiny_run, photos, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_run), str(photos), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "broken.png" in err[0]
        and err[0].endswith("(pass --skip-bad-images to predict the other files)")
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_unknown_output_suffix_is_refused_before_reading_anything(tiny_run, tmp_path, capsys):
    out = tmp_path / "preds.xlsx"
    assert main(["predict", str(tiny_run), str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert "the file name must end in .csv, .tsv, .jsonl, .parquet" in capsys.readouterr().err
    assert not out.exists()


def test_text_and_json_lines_with_a_skipped_file(tiny_run, photos, capsys):
    assert main(["predict", str(tiny_run), str(photos), "--skip-bad-images", "--top-k", "1"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3 and "broken.png" not in captured.out
    assert "gmlp: skipped: " in captured.err
    assert main(["predict", str(tiny_run), str(photos), "--skip-bad-images", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and "broken.png" in rows[3]["error"] and "top_k" not in rows[3]


def test_a_failing_writer_leaves_the_old_file_alone(clf, photos, tmp_path):
    out = tmp_path / "preds.csv"
    out.write_text("old\n")
    with pytest.raises(RuntimeError), open_predictions(out, 2) as writer:
        writer.write(clf.predict(sorted(photos.glob("[0-9].png")), top_k=2))
        raise RuntimeError("stopped half-way")
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["photos", "preds.csv"]


def closed_stdout(*args, cwd=None) -> subprocess.CompletedProcess:
    """``gmlp ARGS`` with a standard output whose reader has already gone, as in ``gmlp ARGS | head -0``."""
    read, write = os.pipe()
    os.close(read)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "gmlp_vision", *map(str, args)], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=300, env=env, cwd=cwd)  # fmt: skip
    finally:
        os.close(write)


@pytest.mark.parametrize("args", [["--help"], ["presets", "-v"], ["info", "{run}"], ["predict", "{run}", "{photos}",
                                  "--skip-bad-images"], ["evaluate", "{run}", "--help"]])  # fmt: skip
def test_commands_exit_0_quietly_when_stdout_is_closed(tiny_run, photos, args):
    done = closed_stdout(*(a.format(run=tiny_run, photos=photos) for a in args))
    assert done.returncode == 0, done.stderr
    assert "Broken pipe" not in done.stderr and "Traceback" not in done.stderr
    if args[0] == "predict":
        assert done.stderr.count("gmlp: skipped: ") == 1  # stderr still says what it must


def test_training_goes_on_when_stdout_is_closed(tmp_path):
    """A run whose reader went away keeps training: its folder holds what the log would have said."""
    done = closed_stdout("train", "--dataset", "digits", "--preset", "tiny", "--epochs", "1", "--threads", "1",
                         "--no-progress", "--out", tmp_path / "run")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "test" in json.loads((tmp_path / "run" / "results.json").read_text())


def test_where_the_table_cannot_go_is_one_line_naming_the_place(tiny_run, clf, photos, tmp_path, capsys, monkeypatch):
    assert main(["predict", str(tiny_run), str(photos), "--output", str(photos)]) == 2
    assert f"--output {photos} is a folder: name a file in it" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), str(photos), "--output", str(tmp_path / "no" / "p.csv")]) == 2
    assert "there is no folder" in capsys.readouterr().err

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)  # the disk fills up as the finished table is put in place
    with pytest.raises(OSError, match="no space left in .*; free some space, or write elsewhere with --output") as e:
        with open_predictions(tmp_path / "p.csv", 2) as writer:
            writer.write(clf.predict(sorted(photos.glob("[0-9].png")), top_k=2))
    assert ".tmp" not in str(e.value) and sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
