"""Training / eval step throughput, MFU and memory: tlflax against PyTorch (timm).

    .venv/bin/python benchmarks/throughput.py                     # the GPU run (defaults)
    .venv/bin/python benchmarks/throughput.py --preset cpu        # the CPU table (issue 16)
    .venv/bin/python benchmarks/throughput.py --models resnet_tiny,vit_tiny,efficientnet_lite_tiny \
        --resolution 32 --batch-sizes 4 --steps 2 --no-torch-compile        # a CPU smoke run

For each model (`name` at --resolution, or `name@px`; `name@px:32/64` gives it its own
batch sizes instead of --batch-sizes), batch size and step kind - `full`,
`last_k` (k=1), `linear_probe` (frozen backbone) and `eval` - it builds the trainer's own
step (tlflax.train: make_train_step through _jit_train_step, make_eval_fn, a phase from
optim.make_phases with SGD; fp32 params, --compute-dtype compute: auto is bfloat16 on an
accelerator, float32 on the CPU, the same on both sides; BatchNorm as the base config's
train.bn_mode) and times it twice on one device:
  synthetic  the same uint8 batch, already on the device, every step;
  input      tlflax's input path: uint8 arrays in an ArraySplit, shuffled and gathered on
             the host, prefetch_to_device (2 ahead); eval as run_eval feeds it (no prefetch).
Both include the device augmentation / normalisation inside the jitted step. Compilation
(lower + compile) is timed apart; then `--warmup` steps, then `--steps` timed steps with one
jax.block_until_ready at the end (no host sync per step).

Model FLOPs per step come from XLA's cost analysis of the same jitted step lowered and
compiled for the CPU backend (XLA's GPU cost analysis undercounts; its figure is kept as
xla_device_flops_per_step, for comparison), at each measured batch size. --flops-batches a,b
fits them through two batches instead (fewer CPU compilations; XLA's count is affine in the
batch to about 1 %: resnet_tiny's full step costs 2.27 - 2.31 MFLOPs per example between
batches 1 and 32).
MFU = FLOPs per step * steps / time / --peak-flops. Memory: XLA's buffer assignment of the
compiled step (arguments + outputs + temporaries - donated aliases) and the device's
peak_bytes_in_use (a running peak of the whole process: JAX cannot reset it).

The PyTorch baseline (--torch) runs first, in a child process, so that neither framework
holds device memory the other needs: timm's resnet50, vit_base_patch16_224 (img_size=px)
and tf_efficientnet_lite0 with the same trainable parameters per step kind, channels_last,
bf16 autocast when the compute is bfloat16, SGD with the same momentum, the same crop /
flip / normalisation on the device, BatchNorm frozen as tlflax's; torch.compile with
--torch-compile. The tiny tlflax models have no PyTorch twin: their torch columns stay
empty. This process re-executes itself with glibc's huge-page tunable, as the tlflax command
does (tlflax/host_malloc.py); the PyTorch child runs without it, as users run PyTorch,
unless --torch-hugetlb.

--preset cpu: Lite0 (batch 32), ResNet-50 and ViT-B/16 (batch 16) at 224 px, every step
kind, float32 compute, torch without compile (on the machine's cores), 3 timed steps after
one warm-up step; flags given after it override it.

Prints a table and one JSON line starting with 'RESULT '.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from tlflax import config_lib, data, experiment, host_malloc, sharding, state, train  # noqa: E402

KINDS = ("full", "last_k", "linear_probe", "eval")
# tlflax name -> (timm name, parameter-name prefixes of the last stage below the head); the
# prefixes are what tlflax's stage_of puts in stage n_stages - 1 (checked by the counts).
TORCH_MODELS = {
    "resnet50": ("resnet50", ("layer4.",)),
    "vit_b16": ("vit_base_patch16_224", ("blocks.11.", "norm.")),
    "efficientnet_lite0": ("tf_efficientnet_lite0", ("conv_head.", "bn2.")),
}
PRESETS = {
    "cpu": {
        "models": "efficientnet_lite0@224:32,resnet50@224:16,vit_b16@224:16",
        "compute_dtype": "float32",
        "steps": 3,
        "warmup": 1,
        "torch_compile": False,
    },
}
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
STEPS_PER_EPOCH = 1000  # any value: the constant schedule makes the step the same
GIB = 2.0**30


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--models", default="resnet50,vit_b16,vit_b16@384,efficientnet_lite0",
        help="comma-separated tlflax model names, each optionally @resolution")  # fmt: skip
    add("--resolution", type=int, default=224, help="input side of models given without @px")
    add("--batch-sizes", default="64,128,256")
    add("--kinds", default=",".join(KINDS), help=f"step kinds, from {','.join(KINDS)}")
    add("--steps", type=int, default=20, help="timed steps per measurement")
    add("--warmup", type=int, default=3, help="untimed steps after compilation")
    add("--num-classes", type=int, default=1000)
    add("--peak-flops", type=float, default=790e12, help="H100/H200 dense bf16: 790e12")
    add("--flops-batches", default="",
        help="'': count FLOPs at each measured batch (exact); 'a,b': fit them affine through "
        "batches a and b (fewer CPU compilations; XLA's count is affine to about 1 %%); "
        "'a': proportional to the batch")  # fmt: skip
    add("--torch", action=argparse.BooleanOptionalAction, default=True)
    add("--torch-compile", action=argparse.BooleanOptionalAction, default=True)
    add("--torch-hugetlb", action=argparse.BooleanOptionalAction, default=False,
        help="the PyTorch child with glibc.malloc.hugetlb=1 as well (default: without, as "
        "users run PyTorch; tlflax's side has it, as the tlflax command does)")  # fmt: skip
    add(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default="auto",
        help="both sides' compute (params stay fp32); auto: float32 on the CPU, else bfloat16",
    )
    add(
        "--preset",
        choices=sorted(PRESETS),
        default="",
        help="a set of defaults (cpu: the CPU table); other flags override it",
    )
    add("--out", default="", help="also write the JSON here")
    add("--worker", choices=("torch",), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.preset:  # the preset's values as defaults, then the flags given again over them
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    if args.compute_dtype == "auto":  # resolved here: the torch child's JAX is CPU-only
        args.compute_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    args.batches = [int(b) for b in args.batch_sizes.split(",") if b]
    args.entries = [
        model_entry(text, args.resolution, args.batches) for text in args.models.split(",") if text
    ]
    args.kind_list = [k for k in args.kinds.split(",") if k]
    args.flops_points = [int(b) for b in args.flops_batches.split(",") if b]
    unknown = sorted(set(args.kind_list) - set(KINDS))
    if unknown or args.steps < 1 or args.warmup < 1 or len(args.flops_points) > 2:
        parser.error(f"--kinds from {KINDS} (got {unknown or 'ok'}), --steps >= 1, "
                     "--warmup >= 1, at most two --flops-batches")  # fmt: skip
    return args


def model_entry(text: str, default_px: int, default_batches: list[int]):
    """'name[@px][:b1/b2]' -> (name, px, batch sizes)."""
    text, _, batches = text.strip().partition(":")
    name, _, px = text.partition("@")
    sizes = [int(b) for b in batches.split("/") if b] if batches else list(default_batches)
    return name, int(px) if px else default_px, sizes


# ----------------------------------------------------------------------------- tlflax setup


def make_config(
    name: str, *, px: int, batch: int, kind: str, num_classes: int, compute_dtype="bfloat16"
):
    """The base config with only what the benchmark fixes; everything else stays default."""
    config = config_lib.get_base_config()
    config.model.name = name
    config.model.num_classes = num_classes
    config.model.compute_dtype = compute_dtype
    config.data.image_size = px
    config.data.batch_size = batch
    config.optim.name = "sgd"
    config.optim.strategy = "full" if kind == "eval" else kind  # eval ignores the phase
    config.optim.k = 1
    config.train.steps = STEPS_PER_EPOCH
    return config_lib.lock(config)


def make_run(config, *, devices) -> experiment.Run:
    """experiment.plan(...) on a one-device mesh over `devices` (the benchmark's one GPU or CPU)."""
    spec = experiment.build_model(config, num_classes=config.model.num_classes)
    prep = experiment.resolve_preprocessing(config, spec)
    run = experiment.plan(
        config, num_classes=config.model.num_classes, steps_per_epoch=STEPS_PER_EPOCH, prep=prep
    )
    return dataclasses.replace(run, mesh=sharding.make_mesh(devices=devices[:1]))


def batch_shapes(run: experiment.Run, batch: int) -> dict:
    s = run.prep.resize  # stored side; the step crops run.prep.resolution out of it
    return {"image": ((batch, s, s, 3), np.uint8), "label": ((batch,), np.int32),
            "mask": ((batch,), np.bool_)}  # fmt: skip


def host_batch(run: experiment.Run, n: int, *, seed: int = 0) -> dict:
    """n random examples, as the host holds a cached split (uint8 at the stored size)."""
    rng = np.random.default_rng(seed)
    image_shape = batch_shapes(run, n)["image"][0]
    return {
        "image": rng.integers(0, 256, image_shape, dtype=np.uint8),
        "label": rng.integers(0, run.spec.module.head.num_classes, n).astype(np.int32),
        "mask": np.ones(n, np.bool_),
    }


def random_head(variables: dict, *, seed: int = 0) -> dict:
    """`variables` with random head weights. The new head is zero-initialised, so every
    first loss is log(classes) and every logit 0 whatever the backbone computes; benchmarks
    that compare two builds of a step by their outputs need outputs that depend on it."""
    rng = np.random.default_rng(seed)
    head = jax.tree_util.tree_map(
        lambda v: (0.05 * rng.standard_normal(v.shape)).astype(v.dtype), variables["params"]["head"]
    )
    return {**variables, "params": {**variables["params"], "head": head}}


def step_and_args(config, run: experiment.Run, kind: str, host_variables, batch):
    """(jitted fn, (first arg, batch)): the trainer's own jitted step for this kind."""
    batch_sh = sharding.batch_sharding(run.mesh)
    device_batch = sharding.host_to_global(batch, batch_sh)
    if kind == "eval":
        variables = jax.device_put(host_variables, sharding.replicated(run.mesh))
        return train.make_eval_fn(run), (variables, device_batch)
    phase = run.phases[0]
    _, shardings = experiment.abstract_state(run, phase)
    st = jax.device_put(state.create(variables=host_variables, tx=phase.tx, seed=0), shardings)
    return train._jit_train_step(config, run, phase, shardings), (st, device_batch)


# ----------------------------------------------------------------------------- FLOPs


class FlopCounter:
    """Model FLOPs per step from XLA's CPU cost analysis: at the batch itself, or fitted."""

    def __init__(self, points):
        self.points = points
        self.cache: dict[tuple, float] = {}  # (model, px, kind, batch) -> FLOPs

    def per_step(self, config, run: experiment.Run, kind: str, batch: int) -> float:
        if not self.points:
            return self.at(config, run, kind, batch)
        values = [self.at(config, run, kind, b) for b in self.points]
        if len(values) == 1:
            return values[0] * batch / self.points[0]
        (b1, b2), (f1, f2) = self.points, values
        return f1 + (f2 - f1) * (batch - b1) / (b2 - b1)

    def at(self, config, run: experiment.Run, kind: str, batch: int) -> float:
        key = (config.model.name, run.prep.resolution, kind, batch)
        if key not in self.cache:
            self.cache[key] = cpu_flops(config, run, kind, batch)
        return self.cache[key]


def cpu_flops(config, run: experiment.Run, kind: str, batch: int) -> float:
    """The same jitted step, lowered with CPU abstract inputs and compiled for the CPU."""
    try:
        cpu_devices = jax.devices("cpu")[:1]
    except RuntimeError as e:
        raise RuntimeError(
            f"FLOPs need JAX's CPU backend ({e}); leave JAX_PLATFORMS unset or add 'cpu' to it"
        ) from e
    cpu_run = dataclasses.replace(run, mesh=sharding.make_mesh(devices=cpu_devices))
    batch_sh = sharding.batch_sharding(cpu_run.mesh)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
        for k, (shape, dtype) in batch_shapes(cpu_run, batch).items()
    }
    phase = cpu_run.phases[0]
    abstract, shardings = experiment.abstract_state(cpu_run, phase)
    if kind == "eval":
        fn, first = train.make_eval_fn(cpu_run), state.variables_of(abstract)
    else:
        fn, first = train._jit_train_step(config, cpu_run, phase, shardings), abstract
    flops = xla_flops(fn.lower(first, abstract_batch).compile())
    if flops is None:
        raise RuntimeError(f"XLA's CPU cost analysis gave no FLOPs for {config.model.name} {kind}")
    return flops


def xla_flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


# ----------------------------------------------------------------------------- tlflax timing


def time_steps(compiled, first, batches, *, kind: str, warmup: int, steps: int):
    """Seconds for `steps` calls after `warmup` ones; train steps thread the donated state."""
    outputs = []

    def call(arg, batch):
        out = compiled(arg, batch)
        if kind == "eval":
            outputs.append(out)  # kept, as run_eval keeps them
            return arg
        return out[0]

    for _ in range(warmup):
        first = call(first, next(batches))
    jax.block_until_ready((first, outputs))
    outputs.clear()
    start = time.perf_counter()
    for _ in range(steps):
        first = call(first, next(batches))
    jax.block_until_ready((first, outputs))
    return time.perf_counter() - start, first


def cached_split(run: experiment.Run, n: int) -> data.ArraySplit:
    """What a cached dataset is on the host: uint8 arrays at the stored size."""
    cached = host_batch(run, n, seed=1)
    return data.ArraySplit(
        cached["image"], cached["label"], name="bench", seed=0, process_index=0, process_count=1
    )


def input_path_batches(run: experiment.Run, kind: str, split: data.ArraySplit, *, batch: int):
    """tlflax's own feeding of a cached split: ArraySplit -> (prefetch) -> global arrays."""
    batch_sh = sharding.batch_sharding(run.mesh)
    if kind == "eval":  # run_eval's loop: no prefetch
        host = split.iterate(global_batch=batch, epoch=0, shuffle=False, drop_remainder=False)
        return (sharding.host_to_global(b, batch_sh) for b in host)
    host = split.iterate(global_batch=batch, epoch=0, shuffle=True, drop_remainder=True)
    return data.prefetch_to_device(host, 2, batch_sh)


def step_memory(compiled) -> int | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def device_peak_bytes(device) -> int | None:
    stats = device.memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def measure_tlflax(args, flops: FlopCounter, case: dict, host_vars, split: data.ArraySplit):
    name, px, batch, kind = case["model"], case["px"], case["batch"], case["step"]
    config = make_config(
        name, px=px, batch=batch, kind=kind, num_classes=args.num_classes,
        compute_dtype=args.compute_dtype,
    )  # fmt: skip
    run = make_run(config, devices=jax.devices())
    fn, (first, device_batch) = step_and_args(config, run, kind, host_vars, host_batch(run, batch))
    start = time.perf_counter()
    compiled = fn.lower(first, device_batch).compile()
    compile_s = time.perf_counter() - start
    device_flops = xla_flops(compiled)
    device = jax.devices()[0]
    if device.platform == "cpu" and device_flops:  # the CPU executable the FLOPs come from
        flops.cache[(name, px, kind, batch)] = device_flops
    timing = dict(kind=kind, warmup=args.warmup, steps=args.steps)
    synth_s, first = time_steps(compiled, first, itertools.repeat(device_batch), **timing)
    feed = input_path_batches(run, kind, split, batch=batch)
    input_s, first = time_steps(compiled, first, feed, **timing)
    feed.close()  # stops the prefetch thread
    model_flops = flops.per_step(config, run, kind, batch)
    trainable = None if kind == "eval" else count_trainable(run.phases[0], host_vars["params"])
    return {
        "tlflax_img_s": batch * args.steps / synth_s,
        "tlflax_input_img_s": batch * args.steps / input_s,
        "flops_per_step": model_flops,
        "xla_device_flops_per_step": device_flops,
        "mfu": model_flops * args.steps / synth_s / args.peak_flops,
        "compile_s": compile_s,
        "jax_step_bytes": step_memory(compiled),
        "jax_peak_bytes": device_peak_bytes(device),
        "tlflax_trainable": trainable,
    }


def count_trainable(phase, params) -> int:
    flags = jax.tree_util.tree_leaves(phase.trainable)
    leaves = jax.tree_util.tree_leaves(params)
    return int(sum(np.size(p) for p, t in zip(leaves, flags, strict=True) if t))


def tlflax_rows(args) -> list[dict]:
    flops = FlopCounter(args.flops_points)
    rows = []
    for name, px, batches in args.entries:
        config = make_config(
            name, px=px, batch=1, kind="full", num_classes=args.num_classes,
            compute_dtype=args.compute_dtype,
        )  # fmt: skip
        run = make_run(config, devices=jax.devices())
        host_vars = jax.device_get(run.spec.init(jax.random.key(0), px))  # reused by every row
        for batch in batches:
            split = cached_split(run, batch * (args.warmup + args.steps))  # one epoch per row
            for kind in args.kind_list:
                row = {"model": name, "px": px, "batch": batch, "step": kind}
                row.update(_guarded(measure_tlflax, args, flops, row, host_vars, split))
                log(row)
                rows.append(row)
    return rows


def _guarded(fn, *fn_args) -> dict:
    """One failed measurement (say, out of memory at the largest batch) leaves the rest."""
    try:
        return fn(*fn_args)
    except Exception as e:  # recorded in the row and in the exit status
        traceback.print_exc()
        first_line = (str(e).splitlines() or [""])[0]
        return {"error": f"{type(e).__name__}: {first_line[:200]}"}


def log(row: dict) -> None:
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
    print(json.dumps(shown), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- PyTorch


def torch_rows(args) -> list[dict]:
    """Runs in the child process (--worker torch); JAX there is CPU-only and never computes."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, px, batches in args.entries:
        for batch, kind in itertools.product(batches, args.kind_list):
            row = {"model": name, "px": px, "batch": batch, "step": kind}
            row.update(_guarded(measure_torch, args, name, px, batch, kind, device))
            log(row)
            rows.append(row)
    return rows


def torch_model(name: str, *, px: int, num_classes: int, device):
    import timm
    import torch

    config = make_config(name, px=px, batch=1, kind="full", num_classes=num_classes)
    arch = experiment.build_model(config, num_classes=num_classes).arch
    # The same stochastic depth as the tlflax model (Lite0: drop_connect_rate 0.2).
    rate = arch.get("drop_path_rate", arch.get("drop_connect_rate", 0.0))
    timm_name, _ = TORCH_MODELS[name]
    extra = {"img_size": px} if timm_name.startswith("vit") else {}
    model = timm.create_model(
        timm_name, pretrained=False, num_classes=num_classes, drop_rate=0.0,
        drop_path_rate=rate, **extra,
    )  # fmt: skip
    return model.to(device, memory_format=torch.channels_last)


def torch_trainable(model, name: str, kind: str) -> list:
    """requires_grad as tlflax's phase: autograd then skips a frozen backbone's backward."""
    head = {id(p) for p in model.get_classifier().parameters()}
    last = TORCH_MODELS[name][1]
    for param_name, p in model.named_parameters():
        in_last = kind == "last_k" and param_name.startswith(last)
        p.requires_grad_(kind in ("full", "eval") or id(p) in head or in_last)
        p.grad = None
    return [p for p in model.parameters() if p.requires_grad]


def torch_train_mode(model, *, train_mode: bool) -> None:
    import torch

    model.train(train_mode)
    if train_mode and config_lib.get_base_config().train.bn_mode == "frozen":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()  # running statistics, as tlflax's bn_mode='frozen'


def torch_transform(prep, *, device, train_mode: bool):
    """uint8 (B, S, S, 3) on the device -> normalised channels_last crops, as tlflax's."""
    import torch

    from tlflax.data import augment

    mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
    size, offset = prep.resolution, augment.centre_offset(prep.resize, prep.resolution)

    def transform(images):
        x = images[:, offset : offset + size, offset : offset + size]
        if train_mode:
            flip = torch.rand(x.shape[0], device=device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(2), x)
        x = x.permute(0, 3, 1, 2).float()  # NHWC memory seen as NCHW: channels_last
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    return transform


def torch_step_fn(model, kind: str, *, params, transform, device, compute_dtype: str):
    import torch
    import torch.nn.functional as F

    base = config_lib.get_base_config().optim

    def autocast():  # bf16 compute as tlflax's compute_dtype; float32: plain fp32
        if compute_dtype == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if kind == "eval":

        @torch.inference_mode()
        def eval_step(images, labels):
            with autocast():
                logits = model(transform(images)).float()
            loss = F.cross_entropy(logits, labels, reduction="none")
            return loss, logits.argmax(-1), logits.topk(5, dim=-1).indices

        return eval_step
    opt = torch.optim.SGD(params, lr=base.lr, momentum=base.momentum)

    def train_step(images, labels):
        with autocast():
            logits = model(transform(images))
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return train_step


def measure_torch(args, name: str, px: int, batch: int, kind: str, device) -> dict:
    import torch

    torch._dynamo.reset()  # a fresh graph per row (requires_grad changes the guards) ...
    gc.collect()  # ... and the previous row's model gone before this row's peak is read
    config = make_config(
        name, px=px, batch=batch, kind=kind, num_classes=args.num_classes,
        compute_dtype=args.compute_dtype,
    )  # fmt: skip
    prep = experiment.resolve_preprocessing(config, experiment.build_model(config, num_classes=1))
    model = torch_model(name, px=px, num_classes=args.num_classes, device=device)
    params = torch_trainable(model, name, kind)
    torch_train_mode(model, train_mode=kind != "eval")
    if args.torch_compile:
        model = torch.compile(model)
    transform = torch_transform(prep, device=device, train_mode=kind != "eval")
    step = torch_step_fn(
        model, kind, params=params, transform=transform, device=device,
        compute_dtype=args.compute_dtype,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    shape = (batch, prep.resize, prep.resize, 3)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, args.num_classes, (batch,), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_s, seconds = time_torch(step, images, labels, args=args, device=device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "torch_img_s": batch * args.steps / seconds,
        "torch_first_step_s": compile_s,
        "torch_peak_bytes": peak,
        "torch_trainable": None if kind == "eval" else sum(p.numel() for p in params),
    }


def time_torch(step, images, labels, *, args, device) -> tuple[float, float]:
    """(first step incl. compilation, seconds of the timed steps); syncs only around loops."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    step(images, labels)
    sync()
    first = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step(images, labels)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(images, labels)
    sync()
    return first, time.perf_counter() - start


def run_torch_child(args) -> dict:
    """The baseline in its own process, before this one's JAX takes the device."""
    entries = [
        f"{n}@{px}:{'/'.join(map(str, batches))}"
        for n, px, batches in args.entries
        if n in TORCH_MODELS
    ]
    if not entries:
        return {}
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "torch",
           "--models", ",".join(entries), "--batch-sizes", args.batch_sizes,
           "--kinds", args.kinds, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--num-classes", str(args.num_classes), "--compute-dtype", args.compute_dtype,
           "--torch-compile" if args.torch_compile else "--no-torch-compile"]  # fmt: skip
    env = host_malloc.with_tunable(os.environ, args.torch_hugetlb)
    env["JAX_PLATFORMS"] = "cpu"  # the child's JAX must not claim the GPU
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:  # a row that failed (exit 1) still leaves the others in RESULT
        print(f"torch baseline failed (exit {done.returncode}); no torch columns", file=sys.stderr)
        return {}
    return json.loads(lines[-1][len("RESULT ") :])


# ----------------------------------------------------------------------------- report


def merge(rows: list[dict], torch_by_key: list[dict]) -> list[dict]:
    key = lambda r: (r["model"], r["px"], r["batch"], r["step"])
    torch_rows_ = {key(r): r for r in torch_by_key}
    merged = []
    for row in rows:
        extra = dict(torch_rows_.get(key(row), {}))
        if "error" in extra:
            extra["torch_error"] = extra.pop("error")
        row = {**row, **{k: v for k, v in extra.items() if k not in row}}
        if row.get("torch_img_s") and row.get("tlflax_img_s"):
            row["tlflax_vs_torch"] = row["tlflax_img_s"] / row["torch_img_s"]
        if row.get("tlflax_input_img_s") and row.get("tlflax_img_s"):
            row["input_vs_synthetic"] = row["tlflax_input_img_s"] / row["tlflax_img_s"]
        merged.append(row)
    return merged


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, evaluated on what this run measured (they are for H100/H200)."""
    by = {(r["model"], r["px"], r["batch"], r["step"]): r for r in rows if "error" not in r}
    checks = []

    def add(target: str, value, threshold: float, **where):
        if value is not None:
            checks.append({"target": target, "value": value, "met": value >= threshold, **where})

    for (model, px, batch, kind), r in by.items():
        at = f"{model}@{px} batch {batch}"
        if kind == "full" and model in ("resnet50", "vit_b16"):
            add(f"{at}: full tlflax/torch >= 1.1", r.get("tlflax_vs_torch"), 1.1)
        if kind == "full" and model == "vit_b16":
            add(f"{at}: full MFU >= 0.35", r["mfu"], 0.35)
        full = by.get((model, px, batch, "full"))
        if kind == "linear_probe" and full:
            ratio = r["tlflax_img_s"] / full["tlflax_img_s"]
            add(f"{at}: linear_probe img/s / full img/s >= 3.5", ratio, 3.5)
    worst = min(by.items(), key=lambda kv: kv[1]["input_vs_synthetic"], default=None)
    if worst:
        (model, px, batch, kind), r = worst
        where = f"{model}@{px} batch {batch} {kind}"
        add("input path / synthetic >= 0.95 (worst row)", r["input_vs_synthetic"], 0.95, at=where)
    return checks


COLUMNS = (
    ("model", "model", "{}"), ("px", "px", "{}"), ("batch", "batch", "{}"), ("step", "step", "{}"),
    ("tlflax_img_s", "tlflax img/s", "{:.1f}"), ("tlflax_input_img_s", "input img/s", "{:.1f}"),
    ("input_vs_synthetic", "input/synth", "{:.2f}"), ("torch_img_s", "torch img/s", "{:.1f}"),
    ("tlflax_vs_torch", "tlflax/torch", "{:.2f}"), ("flops_per_step", "GFLOP/step", "{:.3g}"),
    ("mfu", "MFU %", "{:.3g}"), ("compile_s", "compile s", "{:.1f}"),
    ("jax_step_bytes", "XLA step GiB", "{:.3g}"), ("jax_peak_bytes", "jax peak GiB", "{:.3g}"),
    ("torch_peak_bytes", "torch peak GiB", "{:.3g}"),
)  # fmt: skip


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "error" if key == "tlflax_img_s" and "error" in row else "-"
    if key == "flops_per_step":
        value = value / 1e9
    elif key == "mfu":
        value = 100 * value
    elif key.endswith("_bytes"):
        value = value / GIB
    return fmt.format(value)


def format_table(rows: list[dict]) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    cells += [[cell(r, key, fmt) for key, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def environment(args) -> dict:
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "jax": jax.__version__,
        "peak_flops": args.peak_flops,
        "flops_method": "XLA cost analysis of the same jitted step compiled for the CPU backend, "
        + (f"fitted through batches {args.flops_points}" if args.flops_points else "per batch"),
        "compute": f"{args.compute_dtype} compute, fp32 params, SGD; BatchNorm "
        + config_lib.get_base_config().train.bn_mode,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch_compile": args.torch_compile if args.torch else None,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # tlflax/host_malloc.py
    }


def run(argv=None) -> dict:
    """The whole benchmark; returns what the RESULT line prints."""
    args = parse_args(argv)
    if args.worker == "torch":
        import torch

        tunables = os.environ.get("GLIBC_TUNABLES")
        return {"rows": torch_rows(args), "torch": torch.__version__, "glibc_tunables": tunables}
    baseline = run_torch_child(args) if args.torch else {}  # first: see run_torch_child
    rows = merge(tlflax_rows(args), baseline.get("rows", []))
    env = {**environment(args), "torch": baseline.get("torch"),
           "torch_glibc_tunables": baseline.get("glibc_tunables")}  # fmt: skip
    result = {"env": env, "rows": rows, "targets": check_targets(rows)}
    print(format_table(rows))
    print(f"\ntargets (set for H100/H200 GPUs; this run's device: {result['env']['device']}):")
    for check in result["targets"]:
        verdict = "met    " if check["met"] else "NOT met"
        print(f"{verdict}  {check['target']}: {check['value']:.3g}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result) + "\n")
    return result


def main() -> int:
    if "--worker" not in sys.argv:
        host_malloc.reexec_tuned()  # tlflax's side runs as the tlflax command runs it
    result = run()
    print("RESULT " + json.dumps(result))
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
