"""Shared fixtures and helpers: an isolated sdlora cache (tiny model built once per session, per xdist worker), small
datasets, a config helper, the tiny model, the CLI in a subprocess, no network. Tests that use a module-scoped fixture
(a trained model, a running site) are kept on one xdist worker (`--dist loadgroup`), so it is built once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def sdlora_cache(tmp_path_factory):
    """One cache for the whole session, so builtin:tiny is built once; subprocesses inherit it."""
    cache = Path(os.environ.get("SDLORA_TEST_CACHE") or tmp_path_factory.mktemp("sdlora_cache"))
    os.environ["SDLORA_CACHE"] = str(cache)
    return cache


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Put every test that uses a module-scoped fixture in an xdist group of its module (one per parameter of a
    parametrized module fixture), so the fixture is built once; a test that names its own group keeps it."""
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        if defs is None or item.get_closest_marker("xdist_group"):
            continue
        module_fixtures = [name for name in defs.names_closure
                           if any(fd.scope == "module" for fd in defs.name2fixturedefs.get(name, ()))]
        if module_fixtures:
            params = getattr(item, "callspec", None)
            keys = [str(params.params[name]) for name in module_fixtures if params and name in params.params]
            item.add_marker(pytest.mark.xdist_group("-".join([item.module.__name__, *keys])))
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        _name_groups(items)


def _name_groups(items):
    """What xdist does for --dist loadgroup (the group appended to the node id, `ID@GROUP`, which is how the
    controller keeps a group on one worker), done here because pytest 9 keeps the id in `_id`, which xdist 3.8's
    own `item._nodeid = ...` does not reach."""
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid.rpartition("]")[2] and hasattr(item, "_id"):
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    from sdlora.data.demo import make_demo_dataset

    return Path(make_demo_dataset(tmp_path_factory.mktemp("demo_data"), count=6, size=64))


@pytest.fixture(scope="module")
def tiny():
    """builtin:tiny, loaded once per test module (tests of one module may share it, never two modules)."""
    from sdlora.models import load_base_model

    return load_base_model("builtin:tiny")


def tiny_config(out, data, base: str = "builtin:tiny", **over):
    """A training config on a built-in tiny model at 64 px, batch 2; each test module passes its own settings."""
    from sdlora.config.train_config import make_config

    values = dict(base_model=base, data_dir=str(data), output_dir=str(out), resolution=64, batch_size=2)
    values.update(over)
    return make_config(**values)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def model_and_pipeline(spec: str):
    """(BaseModel, its quiet inference pipeline) for a built-in model."""
    from sdlora.models import load_base_model

    base = load_base_model(spec)
    pipe = base.make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return base, pipe


def run_cli(*args, check=True, timeout=600):
    """`python -m sdlora ARGS` in a subprocess; with check, a non-zero exit fails with both outputs."""
    proc = subprocess.run([sys.executable, "-m", "sdlora", *map(str, args)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
