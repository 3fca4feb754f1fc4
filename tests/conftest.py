"""Shared fixtures: the real assets (pretrained ResNet-20, 1000 real CIFAR-10 test images)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The modules that take longest, longest first (seconds in a 2-worker run on a 2-core AMD EPYC,
# 2026-12-08: flows 1051, lab 697, faults 593, pipeline 358, gpu_scripts 259, bookkeeping 244,
# workspace 202, security 166, export 156): the test processes (scripts/test.sh, pytest-xdist, a
# module at a time) start them first and the short modules fill the gaps. One process keeps the
# files' order.
SLOW_FIRST = ("tests/flows/test_flows.py", "tests/flows/test_lab.py", "tests/flows/test_faults.py",
              "tests/pipeline/test_pipeline.py", "tests/scripts/test_gpu_scripts.py",
              "tests/flows/test_bookkeeping.py", "tests/flows/test_workspace.py",
              "tests/flows/test_security.py", "tests/export/test_export.py", "tests/flows/test_tracking.py",
              "tests/run/test_run.py", "tests/method/test_speedups.py", "tests/run/test_run_folder.py",
              "tests/pipeline/test_dvc_deps.py", "tests/flows/test_recording.py",
              "tests/export/test_fast_export.py")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # one of several test processes on the machine: one thread each (and in the processes
        # the tests start), not one per core each
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if not getattr(config.option, "numprocesses", None):
        return
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: in-module order kept


def assets_dir() -> Path | None:
    env = os.environ.get("TEXQ_ASSETS")
    path = Path(env) if env else ROOT.parent / "shared" / "assets"
    return path if (path / "cifar10" / "resnet20-12fca82f.th").is_file() else None


@pytest.fixture(scope="session")
def assets() -> Path:
    path = assets_dir()
    if path is None:
        if os.environ.get("TEXQ_REQUIRE_ASSETS") == "1":
            pytest.fail("the shared assets are required (TEXQ_REQUIRE_ASSETS=1) but not found: "
                        "set TEXQ_ASSETS to the folder holding cifar10/resnet20-12fca82f.th")
        pytest.skip("shared assets not found (set TEXQ_ASSETS)")
    return path


@pytest.fixture(scope="session")
def shared_checkpoint(assets) -> Path:
    return assets / "cifar10" / "resnet20-12fca82f.th"


@pytest.fixture(scope="session")
def test1000(assets) -> Path:
    return assets / "cifar10" / "test_first1000.npz"


@pytest.fixture(scope="session")
def shared_model(shared_checkpoint):
    from texq.models import create_model

    return create_model("resnet20a_cifar10", checkpoint=shared_checkpoint)


@pytest.fixture(scope="session")
def test1000_data(test1000, shared_model):
    from texq.data import load_eval_data

    return load_eval_data(str(test1000), shared_model.texq_info)


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """A random-init ResNet-8 checkpoint, a small labelled .npz standing in for evaluation data
    and another for training data (runs in seconds; no meaningful accuracy)."""
    import numpy as np
    import torch

    from texq.models import create_model

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    ckpt = root / "r8.pt"
    torch.save(create_model("resnet8_cifar10").state_dict(), ckpt)
    rng = np.random.default_rng(0)
    data = root / "eval.npz"
    np.savez(data, x=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), y=np.arange(40) % 10)
    train = root / "train.npz"
    np.savez(train, x=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), y=np.arange(64) % 10)
    return ckpt, data, train


@pytest.fixture(scope="session")
def tiny_params(tiny_setup, tmp_path_factory):
    """A tiny-profile params file for a random-init ResNet-8 and a small .npz."""
    ckpt, data, _ = tiny_setup
    root = tmp_path_factory.mktemp("pipe")
    import yaml

    from texq.pipeline import load_params

    params = load_params(ROOT / "params.yaml")
    params["profile"] = "tiny"
    params.update(model="resnet8_cifar10", checkpoint=str(ckpt), pretrained=False, data=str(data))
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny_setup, tmp_path_factory):
    """A finished ``texq run`` folder of tiny_setup's model (tiny profile, TexQ W4A4, seed 0, CPU),
    shared by the tests that read one: read it, never write into it."""
    from texq.run import RunConfig, run

    ckpt, data, _ = tiny_setup
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    run(RunConfig.for_profile("tiny", model="resnet8_cifar10", checkpoint=str(ckpt), data=str(data),
                              device="cpu"), out, progress=False)
    return out
