"""Shared test set-up: everything runs offline, on the CPU, with the sandbox assets shipped in the repository."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (`-n 2`) each worker process gets one thread, and so do the scripts its tests start (they
    # inherit the environment): two workers with two threads each would fight over the two cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (real PartiPrompts and DreamBench files); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real public test data not found at {SHARED_DATA} (only present on the project's machines)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def ppd_data(tmp_path_factory):
    """A small PPD build (the first 240 sandbox pairs, 4 users each), shared by the PPD training tests."""
    from diffalign.data.ppd import build_ppd_data

    out = tmp_path_factory.mktemp("ppd") / "data"
    build_ppd_data(out, max_source_pairs=240, users_per_pair=4)
    return out


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
