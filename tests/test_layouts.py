"""Own data in: image folders in every layout (class folders, train/ alone, train/ + val/ + test/), CSV and TSV label
tables, the stratified hold-out recorded in the run, and the kind chosen by --data alone."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gmlp_vision.cli import main
from gmlp_vision.config import resolve_config
from gmlp_vision.data import load_dataset
from gmlp_vision.data.layout import hold_out, read_holdout
from gmlp_vision.errors import DataError
from gmlp_vision.kinds import kind_of_data

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = {"ant": (200, 40, 40), "bee": (40, 200, 40), "cow": (40, 40, 200)}


def images(folder: Path, per_class: int, start: int = 0) -> Path:
    """``per_class`` small PNGs of each class (a colour of its own) under ``folder/<class>/``."""
    rng = np.random.default_rng(start)
    for name, colour in CLASSES.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.png")
    return folder


def load(path, tmp_path, kind="folder", **options):
    return load_dataset(kind, path, image_size=12, cache_dir=tmp_path / "cache", progress=False, **options)


def test_the_hold_out_is_stratified_fixed_and_can_be_given():
    files = [(Path(f"c{c}/{i}.png"), c) for c in range(3) for i in range((10, 5, 1)[c])]
    train, held = hold_out(files, Path("."), 0.2, None)
    assert Counter(c for _, c in held) == {0: 2, 1: 1}  # round(20 %) of each class, none of a class of one
    assert sorted(train + held) == sorted(files) and not set(train) & set(held)
    assert hold_out(files, Path("."), 0.2, None) == (train, held)  # the same draw every time
    chosen = ("c0/3.png", "c2/0.png")
    train2, held2 = hold_out(files, Path("."), 0.2, chosen)
    assert [p.as_posix() for p, _ in held2] == ["c0/3.png", "c2/0.png"] and len(train2) == 14
    with pytest.raises(DataError, match="c0/99.png is gone"):
        hold_out(files, Path("."), 0.2, ("c0/99.png",))


@pytest.mark.parametrize("layout", ["class folders", "train/ alone"])
def test_folders_without_a_test_split_hold_out_a_fifth_of_each_class(tmp_path, layout):
    root = tmp_path / "photos"
    images(root if layout == "class folders" else root / "train", per_class=10)
    ds = load(root, tmp_path)
    assert ds.classes == tuple(CLASSES) and ds.test_split == "holdout" and layout in ds.layout
    assert len(ds.train) == 24 and len(ds.test) == 6 and ds.test.labels.bincount().tolist() == [2, 2, 2]
    prefix = "" if layout == "class folders" else "train/"
    assert len(ds.holdout) == 6 and all(name.startswith(f"{prefix}ant/") for name in ds.holdout[:2])
    again = load(root, tmp_path, holdout_files=ds.holdout[:3])
    assert len(again.test) == 3 and again.holdout == ds.holdout[:3]


def test_train_val_and_test_folders_validate_on_val_and_test_on_test(tmp_path):
    root = tmp_path / "photos"
    for split, n in (("train", 8), ("val", 3), ("test", 4)):
        images(root / split, n)
    ds = load(root, tmp_path)
    assert (len(ds.train), len(ds.val), len(ds.test), ds.test_split, ds.holdout) == (24, 9, 12, "test", ())


def write_table(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_csv_with_a_split_column_and_a_tsv_without(tmp_path):
    images(tmp_path / "imgs", per_class=6)
    rows = ["filename,split,Class"]  # the columns' names are found whatever their order and case
    for name in CLASSES:
        rows += [f"imgs/{name}/{i:03d}.png,{'test' if i == 5 else 'train'},{name}" for i in range(6)]
    ds = load(write_table(tmp_path / "labels.csv", "\n".join(rows) + "\n\n"), tmp_path, "csv")
    assert (ds.name, ds.classes, len(ds.train), len(ds.test), ds.test_split) == ("csv", tuple(CLASSES), 15, 3, "test")
    lines = ["path\tlabel"] + [f"{tmp_path}/imgs/{n}/{i:03d}.png\t{n}" for n in CLASSES for i in range(6)]
    ds = load(write_table(tmp_path / "labels.tsv", "\n".join(lines)), tmp_path, "csv")
    assert (len(ds.train), len(ds.test), ds.test_split) == (15, 3, "holdout")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,label\na.png,x\n", "first line must name its columns: path and label"),
        ("path,label\nimgs/ant/000.png,ant,extra\n", "line 2: 3 fields, the header has 2"),
        ("path,label\nimgs/ant/000.png,\n", "line 2: an empty label"),
        ("path,label,split\nimgs/ant/000.png,ant,holdout\n", "line 2: split 'holdout' is not one of train, val, test"),
        ("path,label\nimgs/ant/000.png,ant\nimgs/ant/nope.png,ant\n", "line 3: no image file imgs/ant/nope.png"),
        ("path,label\n", "has no rows under its header"),
        ("path,label,split\nimgs/ant/000.png,ant,test\n", "has no training rows"),
        ("path,label\xff\n", "is not UTF-8 text"),
        ("path,label,split\nimgs/ant/000.png,ant,train\n./imgs/ant/000.png,ant,test\n",
         "line 3: ./imgs/ant/000.png is in the test split and \\(line 2\\) in train"),
    ],
)  # fmt: skip
def test_a_bad_table_is_one_line_that_names_the_row(tmp_path, text, message):
    images(tmp_path / "imgs", per_class=1)
    table = tmp_path / "labels.csv"
    table.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=message) as caught:
        load(table, tmp_path, "csv")
    assert "\n" not in str(caught.value)


def test_data_alone_names_its_kind(tmp_path):
    images(tmp_path / "photos", per_class=1)
    write_table(tmp_path / "labels.tsv", "path\tlabel\n")
    (tmp_path / "cifar" / "cifar-100-python").mkdir(parents=True)
    (tmp_path / "extracted").mkdir()
    (tmp_path / "extracted" / "meta").write_bytes(b"")
    (tmp_path / "extracted" / "sub").mkdir()
    kinds = {name: kind_of_data(str(tmp_path / name)) for name in ("photos", "labels.tsv", "cifar", "extracted", "no")}
    assert kinds == {"photos": "folder", "labels.tsv": "csv", "cifar": None, "extracted": None, "no": None}
    assert resolve_config({"data": str(tmp_path / "photos")}).data.dataset == "folder"
    assert resolve_config({"data": str(tmp_path / "photos"), "dataset": "cifar10"}).data.dataset == "cifar10"


def test_a_run_on_class_folders_records_its_hold_out_and_tests_on_it_again(tmp_path, monkeypatch, capsys):
    """--data alone picks the kind; evaluate and a resumed run test on the files the run's start held out."""
    monkeypatch.setenv("GMLP_DATA", str(tmp_path / "cache"))
    root = images(tmp_path / "photos", per_class=10)
    run = tmp_path / "run"
    flags = ["--epochs", "1", "--image-size", "12", "--threads", "1", "--no-progress", "--out", str(run)]
    assert main(["train", "--data", str(root), *flags]) == 0
    out = capsys.readouterr().out
    assert "training general on folder: 21 train / 3 validation images" in out
    assert (
        "data: class folders, 20% of each class held out for testing; validation (val_*): the last 10% of training; "
        "final evaluation: held-out test, 6 images"
    ) in out
    assert "Held-out test accuracy" in out
    recorded = json.loads((run / "holdout.json").read_text())
    assert recorded["holdout"] == 0.2 and len(recorded["test"]) == 6 and read_holdout(run) == tuple(recorded["test"])
    results = json.loads((run / "results.json").read_text())
    assert results["test_split"] == "holdout" and results["images"]["test"] == 6
    images(root, per_class=10, start=10)  # twice the images now: a new draw would hold out 12
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert "final evaluation: held-out test, 6 images" in capsys.readouterr().out
    (run / "holdout.json").write_text('{"test": "all"}')
    assert main(["evaluate", str(run)]) == 1
    assert "is no hold-out record" in capsys.readouterr().err


def test_a_table_trains_from_the_command_line_without_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GMLP_DATA", str(tmp_path / "cache"))
    images(tmp_path / "imgs", per_class=5)
    rows = ["path,label,split"] + [f"imgs/{n}/{i:03d}.png,{n},{('train', 'train', 'train', 'val', 'test')[i]}"
                                   for n in CLASSES for i in range(5)]  # fmt: skip
    table = write_table(tmp_path / "labels.csv", "\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(table), "--epochs", "1", "--image-size", "12", "--threads", "1",
                 "--no-progress", "--out", str(run)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "training general on csv: 9 train / 3 validation images" in out  # the val rows validate
    assert (
        "labels.csv: train, val and test rows; validation (val_*): the data's own val split; final evaluation: test, 3"
        in out
    )
    assert not (run / "holdout.json").exists()


@pytest.mark.parametrize("splits", [("train",), ("train", "val", "test")])
def test_the_other_folder_layouts_train_from_the_command_line(tmp_path, monkeypatch, capsys, splits):
    monkeypatch.setenv("GMLP_DATA", str(tmp_path / "cache"))
    root = tmp_path / "photos"
    for split in splits:
        images(root / split, per_class=10 if split == "train" else 3)
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--epochs", "1", "--image-size", "12", "--threads", "1", "--no-progress",
                 "--out", str(run)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    if splits == ("train",):
        assert "training general on folder: 21 train / 3 validation images" in out
        assert "train/ alone, 20% of each class held out for testing" in out and "Held-out test accuracy" in out
        assert json.loads((run / "holdout.json").read_text())["test"][0].startswith("train/ant/")
    else:
        assert "training general on folder: 30 train / 9 validation images" in out  # val/ validates
        assert "validation (val_*): the data's own val split; final evaluation: test, 9 images" in out
        assert "Test accuracy" in out and not (run / "holdout.json").exists()


def test_a_folder_of_loose_images_says_how_to_lay_it_out(tmp_path, capsys):
    loose = tmp_path / "photos"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    assert main(["train", "--data", str(loose), "--epochs", "1", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert "holds image files but no class folders" in err and "photos/<class>/" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
