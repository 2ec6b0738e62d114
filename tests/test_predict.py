"""`tlflax predict` as users call it: files, folders and globs, CSV / JSON out, bad files
listed, test-time augmentation; and `tlflax --help`, `COMMAND --help`, `tlflax config`."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tlflax import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny_config.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "tlflax.main", "train", "--config", TINY, "--workdir", str(run)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _photos(root: pathlib.Path) -> dict[str, pathlib.Path]:
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    files = {
        "noise": root / "a_noise.png",
        "symmetric": root / "b_symmetric.png",
        "flat": root / "sub" / "c_flat.jpg",
        "broken": root / "sub" / "d_broken.jpg",
    }
    Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(files["noise"])
    half = rng.integers(0, 256, (20, 10, 3), dtype=np.uint8)
    Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(files["symmetric"])
    Image.new("RGB", (20, 20), (90, 160, 30)).save(files["flat"], quality=100)
    files["broken"].write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (root / ".hidden.png").write_bytes(b"ignored")
    return files


def _predict(capsys, workdir, *args) -> tuple[int, str]:
    code = main.main(["tlflax", "predict", "--workdir", str(workdir), *args])
    return code, capsys.readouterr().out


def _csv(path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def test_predict_a_folder_writes_csv_and_lists_the_bad_file(workdir, tmp_path, capsys):
    files = _photos(tmp_path / "photos")
    out = tmp_path / "out" / "predictions.csv"
    code, stdout = _predict(capsys, workdir, str(tmp_path / "photos"), "--top_k", "3", "--out",
                            str(out), "--batch_size", "2")  # fmt: skip
    assert code == 0
    rows = _csv(out)
    assert list(rows) == [str(files[k]) for k in ("noise", "symmetric", "flat", "broken")]
    broken = rows[str(files["broken"])]
    assert broken["error"].startswith(("corrupt", "not_an_image", "truncated"))
    assert broken["class_1"] == ""
    for name in ("noise", "symmetric", "flat"):
        row = rows[str(files[name])]
        probs = [float(row[f"prob_{i}"]) for i in (1, 2, 3)]
        assert row["error"] == "" and probs == sorted(probs, reverse=True) and sum(probs) <= 1
        assert row["class_1"] in [str(d) for d in range(10)]
    assert f"{files['broken']}: cannot read image" in stdout
    assert "3 of 4 files predicted" in stdout


def test_globs_json_and_test_time_augmentation(workdir, tmp_path, capsys):
    files = _photos(tmp_path / "photos")
    pattern = str(tmp_path / "photos" / "*.png")
    out = tmp_path / "p.json"
    assert _predict(capsys, workdir, pattern, "--out", str(out), "--top_k", "10")[0] == 0
    plain = json.loads(out.read_text())
    assert [p["file"] for p in plain["predictions"]] == [str(files["noise"]),
                                                       str(files["symmetric"])]  # fmt: skip
    probs = {p["file"]: {t["class"]: t["prob"] for t in p["top"]} for p in plain["predictions"]}
    assert sum(probs[str(files["noise"])].values()) == pytest.approx(1.0, abs=1e-5)
    # A mirror-symmetric image is its own flip: 'flip' averages two equal views.
    flipped = tmp_path / "f.json"
    assert _predict(capsys, workdir, pattern, "--out", str(flipped), "--top_k", "10",
                    "--tta", "flip")[0] == 0  # fmt: skip
    tta = {p["file"]: {t["class"]: t["prob"] for t in p["top"]}
           for p in json.loads(flipped.read_text())["predictions"]}  # fmt: skip
    sym = str(files["symmetric"])
    for label, p in probs[sym].items():
        assert tta[sym][label] == pytest.approx(p, abs=1e-6)
    noise = str(files["noise"])
    assert max(abs(tta[noise][k] - probs[noise][k]) for k in probs[noise]) > 1e-6  # not a no-op
    # A flat image looks the same from every crop: 'crops' (10 views) changes nothing.
    flat = [str(files["flat"])]
    _, one = _predict(capsys, workdir, *flat, "--top_k", "10")
    _, ten = _predict(capsys, workdir, *flat, "--top_k", "10", "--tta", "crops")
    assert one == ten


def test_predict_input_errors_are_one_line(workdir, tmp_path, capsys):
    for args, message in (
        ([str(tmp_path / "missing.jpg")], "no such file"),
        ([str(tmp_path / "*.nothing")], "no such file"),
        ([str(_photos(tmp_path / "p")["noise"]), "--out", str(tmp_path / "x.txt")], ".csv or"),
        ([str(tmp_path / "p"), "--tta", "rotate"], "--tta='rotate'"),
    ):
        assert main.main(["tlflax", "predict", "--workdir", str(workdir), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_eval_with_test_time_augmentation(workdir, capsys):
    assert main.main(["tlflax", "eval", "--workdir", str(workdir), "--tta", "flip"]) == 0
    assert "errors" in capsys.readouterr().out


# ----------------------------------------------------------------------------- help


def test_help_lists_commands_flags_and_examples(capsys):
    assert main.main(["tlflax", "--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "predict", "inspect", "config"):
        assert f"\n  {command} " in out
    assert "folder" in out and "demo" in out  # built-in configs by name
    for command in ("train", "eval", "predict", "inspect", "config"):
        assert main.main(["tlflax", command, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: tlflax {command} ") and "examples:" in text
    assert main.main(["tlflax", "predict", "-h"]) == 0
    assert "--out: predict: write the predictions" in capsys.readouterr().out
    assert main.main(["tlflax"]) == 2 and "usage: tlflax COMMAND" in capsys.readouterr().err


def test_config_lists_every_key_with_its_meaning_and_changed_defaults(capsys, monkeypatch):
    monkeypatch.chdir(ROOT.parent)  # built-in names work from anywhere
    argv = ["tlflax", "config", "--config", "folder:path=PHOTOS", "--config.optim.k=2"]
    assert main.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    by_key = {line.split(" = ")[0]: line for line in lines}
    from tlflax import config_lib, tree

    keys = {k.replace("/", ".") for k in tree.flatten(config_lib.get_base_config().to_dict())}
    assert keys <= set(by_key)
    assert by_key["optim.k"] == (
        "optim.k = 2  (default: 1)  # last_k: stages >= n_stages - k train (plus the head)"
    )
    assert by_key["data.path"].startswith("data.path = 'PHOTOS'  (default: '')  # folder: root")
    assert "# init, data order, augmentation, dropout; not the carved split" in by_key["seed"]
    assert sum("#" not in line for line in lines) <= 3, [x for x in lines if "#" not in x]
