"""A config for trainer tests: resnet_tiny (BatchNorm) on sklearn's digits at 16 px.

    tlflax train --config tests/tiny_config.py --workdir DIR [--config.x=y ...]

Random init (no weights), two_phase 4 + 4 steps of 16 images, BatchNorm statistics
updating (bn_mode='train') so that sharding and resume must get them right too.
"""

from tlflax import config_lib

# The data and model of trainer tests written as flattened overrides (resnet_tiny on digits
# at 16 px), for tests that build their own config around them.
DIGITS = {
    "model.name": "resnet_tiny",
    "data.source": "digits",
    "data.val_fraction": 0.1,
    "data.image_size": 16,
    "data.batch_size": 16,
}


def get_config(arg=None):
    del arg
    c = config_lib.get_base_config()
    c.model.name = "resnet_tiny"
    c.data.source = "digits"
    c.data.val_fraction = 0.1
    c.data.image_size = 16
    c.data.batch_size = 16
    c.data.eval_batch_size = 48
    c.aug.flip = False
    c.aug.rotation = 10.0  # resampling + per-example keys: exercises the augment rngs
    c.optim.strategy = "two_phase"
    c.optim.name = "adam"
    c.optim.lr = 1e-2
    c.optim.probe_steps = 4
    c.optim.finetune_steps = 4
    c.optim.finetune_lr = 1e-3
    c.optim.lr_decay = "exponential"
    c.train.bn_mode = "train"
    c.train.log_every = 1
    c.train.eval_every = 4
    c.train.checkpoint_every = 2
    c.train.keep_last = 20
    return config_lib.lock(c)
