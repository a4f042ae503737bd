"""Shared test setup: the ../shared folder beside the checkout (spec configs, TAESD/LPIPS weights, images)."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LATENTUP_SHARED", REPO.parent / "shared"))
SPEC = SHARED / "spec"

os.environ.setdefault("LATENTUP_WEIGHTS", str(SHARED / "weights"))
os.environ.setdefault("LATENTUP_DATA", str(SHARED / "datasets"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    return SPEC


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP stalls when the CPU is shared (100x slower steps seen with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
