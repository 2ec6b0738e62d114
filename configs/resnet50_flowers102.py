"""Seed 2: ResNet-50 (ImageNet, Hugging Face hub) on Oxford Flowers-102, feature extraction
for 16 epochs, then everything for 8 with the learning rate divided by 3 per stage.

    .venv/bin/pip install -e '.[tfds]'
    .venv/bin/tlflax train --config configs/resnet50_flowers102.py --workdir runs/rn50_flowers102
    .venv/bin/tlflax train --config configs/resnet50_flowers102.py:runlocal --workdir /tmp/x

As in the tutorial it trains on the 6,149-image split ('test' in TFDS) and validates on
the 2,040 others. Needs the network once (hub weights, TFDS download); afterwards both are
cached. Tutorial result: 91-94 % after feature extraction, 96+ % after fine-tuning.
runlocal: a tiny random-init ResNet for 2 + 2 steps (a smoke run of the wiring).
"""

from tlflax import config_lib


def get_config(arg=None):
    a = config_lib.parse_arg(arg, {"runlocal": False})
    c = config_lib.get_base_config()
    c.model.name = "resnet50"
    c.weights.source = "hf:microsoft/resnet-50"
    c.data.source = "tfds"
    c.data.name = "oxford_flowers102"
    c.data.train_split = "test"
    c.data.eval_split = "train+validation"
    c.data.batch_size = 32
    c.aug.flip = True
    c.aug.rotation = 15.0
    c.aug.crop = "inception"
    c.aug.brightness = c.aug.contrast = c.aug.saturation = 0.2  # colour jitter (seed 2)
    c.optim.strategy = "two_phase"
    c.optim.name = "adam"
    c.optim.lr = 1e-3
    c.optim.probe_epochs = 16.0
    c.optim.finetune = "full"
    c.optim.finetune_lr = 1e-4
    c.optim.lr_decay = "exponential"
    c.optim.stage_divisor = 3.0
    c.optim.finetune_epochs = 8.0
    c.train.bn_mode = "frozen"
    if a["runlocal"]:
        config_lib.shrink_for_cpu(c, model="resnet_tiny")
    return config_lib.lock(c)
