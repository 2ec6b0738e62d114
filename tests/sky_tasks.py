"""Load SkyPilot task files with SkyPilot's own parser and print what it made of them.

Run by tests/test_launch.py under the Python that has SkyPilot: the launch venv that
`make setup-test` builds (.venv-sky: SkyPilot runs where you launch from, not where jax
trains, and its click cap would hold huggingface_hub back in the test venv), or the test
interpreter itself when `pip install -e '.[launch]'` put SkyPilot there.

stdin: a JSON list of requests {"file": PATH, "envs": {K: V}} ("envs": null loads the
file as `sky.Task.from_yaml` does, with no --env at all). stdout: a JSON list, one answer
per request: {"error": "Type: message"} or the task's fields the tests check.
"""

from __future__ import annotations

import json
import sys


def _answer(sky, yaml, request) -> dict:
    try:
        if request["envs"] is None:
            task = sky.Task.from_yaml(request["file"])
        else:
            with open(request["file"]) as f:
                config = yaml.safe_load(f)
            # The CLI's own path for `sky launch FILE --env K=V`.
            task = sky.Task.from_yaml_config(config, env_overrides=list(request["envs"].items()))
    except Exception as e:  # noqa: BLE001 (the test asserts on the type and message)
        return {"error": f"{type(e).__name__}: {e}"}
    (resources,) = task.resources
    accelerators = dict(resources.accelerators or {})
    return {
        "accelerators": accelerators,
        "known_tpus": sorted(a for a in accelerators if a in sky.catalog.get_tpus()),
        "accelerator_args": dict(resources.accelerator_args or {}),
        "use_spot": resources.use_spot,
        "job_recovery": resources.job_recovery,
        "num_nodes": task.num_nodes,
        "workdir": task.workdir,
        "setup": task.setup,
        "run": task.run,
        "envs": dict(task.envs),
        "sky_version": sky.__version__,
    }


def requirement() -> str:
    """SkyPilot's line of pyproject.toml's [launch] extra (the Makefile installs it)."""
    import pathlib  # noqa: PLC0415
    import re  # noqa: PLC0415

    # A regex, not tomllib: the Makefile may run this on Python 3.10.
    text = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (launch,) = re.findall(r"^launch = \[(.*)\]$", text, flags=re.M)
    (line,) = re.findall(r'"(skypilot[^"]*)"', launch)
    return line


def main() -> None:
    if sys.argv[1:] == ["--requirement"]:
        print(requirement())
        return
    import sky  # noqa: PLC0415 (after the caller's HOME / usage settings are in place)
    import sky.catalog  # noqa: F401, PLC0415
    import yaml  # noqa: PLC0415

    requests = json.load(sys.stdin)
    json.dump([_answer(sky, yaml, r) for r in requests], sys.stdout)


if __name__ == "__main__":
    main()
