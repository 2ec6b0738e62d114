"""`tlflax inspect`'s table: a model's modules in forward order, each with its output shape,
its own parameters and statistics (counted apart, so that the rows add up to the totals),
its FLOPs per image and, under a config, whether its parameters train.

The order and shapes come from one abstract forward pass (jax.eval_shape, nothing
computed) with flax's method interceptor; each module that does its own computation (no
submodule calls) is lowered alone and XLA's cost analysis counts its FLOPs. Whatever the
parent modules compute between them (activations, residual adds, pooling) is one last row,
so the FLOPs column adds up to the whole model's.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tlflax import tree


@dataclasses.dataclass
class Call:
    path: str  # '/'-joined, as parameter names ('backbone/stem/conv')
    module: nn.Module  # the bound module (clone(parent=None) re-applies it alone)
    args: tuple  # ShapeDtypeStructs of the positional arguments
    kwargs: dict
    out_shape: tuple = ()
    leaf: bool = True  # called no submodule


def forward_calls(module: nn.Module, variables: dict, image_size: int) -> list[Call]:
    """Every module call of one forward pass of a (1, size, size, 3) image, in call order."""
    calls: list[Call] = []
    stack: list[Call] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(str(p) for p in context.module.scope.path)
        shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args if hasattr(a, "shape"))
        call = Call(path, context.module, shapes, dict(kwargs))
        if stack:
            stack[-1].leaf = False
        calls.append(call)
        stack.append(call)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            stack.pop()
        call.out_shape = tuple(getattr(out, "shape", ()))
        return out

    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, image)
    return calls


def flops(fn, *args) -> float:
    """XLA's FLOP count of fn(*args) (abstract arguments; nothing runs)."""
    analysis = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def _own(variables: dict, path: str) -> dict:
    """The variables that the module at `path` owns directly (not its submodules')."""
    out = {}
    for collection, sub in variables.items():
        node = sub
        for part in path.split("/") if path else ():
            node = node.get(part, {}) if isinstance(node, dict) else {}
        leaves = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if leaves:
            out[collection] = leaves
    return out


def _call_flops(call: Call, variables: dict) -> float:
    alone = call.module.clone(parent=None)
    own = _own(variables, call.path)
    return flops(lambda v, *a: alone.apply(v, *a, **call.kwargs), own, *call.args)


@dataclasses.dataclass
class Row:
    path: str
    out_shape: tuple
    params: int
    state: int
    flops: float
    status: str  # 'trainable' | 'frozen' | 'mixed' | '' (no config)
    shapes: str
    trainable: int = 0  # of params


def rows(module, variables: dict, *, image_size: int, trainable: dict | None) -> list[Row]:
    """One row per module that owns variables or computes alone, in forward order."""
    calls = forward_calls(module, variables, image_size)
    out, seen = [], set()
    for call in calls:
        own = _own(variables, call.path)
        if call.path in seen or not (own or call.leaf):
            continue
        seen.add(call.path)
        cost = _call_flops(call, variables) if call.leaf else 0.0
        out.append(_row(call.path, call.out_shape, own, cost, trainable))
    total = flops(lambda v, x: module.apply(v, x, train=False), variables, calls[0].args[0])
    rest = max(total - sum(r.flops for r in out), 0.0)
    out.append(Row("(between modules: activations, adds, pooling)", (), 0, 0, rest, "", ""))
    return out


def _row(path, out_shape, own: dict, cost: float, trainable) -> Row:
    params = tree.flatten(own.get("params", {}))
    state = {k: v for c, sub in own.items() if c != "params" for k, v in tree.flatten(sub).items()}
    count = lambda leaves: sum(int(np.prod(v.shape)) for v in leaves.values())
    status, n_trainable = "", 0
    if trainable is not None and params:
        train = {n: v for n, v in params.items() if trainable[f"{path}/{n}" if path else n]}
        n_trainable = count(train)
        status = {0: "frozen", len(params): "trainable"}.get(len(train), "mixed")
    shapes = " ".join(f"{n}{tuple(v.shape)}" for n, v in {**params, **state}.items())
    return Row(path, out_shape, count(params), count(state), cost, status, shapes, n_trainable)


def format_table(table: list[Row], *, name: str, with_status: bool) -> str:
    width = max([len("module")] + [len(r.path) for r in table])
    shape_w = max([len("output")] + [len(str(r.out_shape)) for r in table])
    head = f"{'module':<{width}}  {'output':<{shape_w}}  {'params':>11}  {'state':>8}  {'FLOPs':>9}"
    lines = [f"Model: {name}", head + ("  status    " if with_status else "  ") + "variables"]
    for r in table:
        line = f"{r.path:<{width}}  {str(r.out_shape or ''):<{shape_w}}  {r.params:>11,}  "
        line += f"{r.state:>8,}  {_si(r.flops):>9}  "
        lines.append((line + (f"{r.status:<10}" if with_status else "") + r.shapes).rstrip())
    total = sum(r.params for r in table)
    lines.append(f"Total params: {total:,}")
    if with_status:
        trainable = sum(r.trainable for r in table)
        lines.append(f"Trainable params: {trainable:,}")
        lines.append(f"Frozen params: {total - trainable:,}")
    lines.append(f"Non-trainable state (BatchNorm statistics): {sum(r.state for r in table):,}")
    lines.append(f"FLOPs per image: {_si(sum(r.flops for r in table))} (XLA cost analysis)")
    return "\n".join(lines)


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"
