import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
MANIFESTS = SHARED / "manifests"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def require(path: Path) -> Path:
    """Skip (with the reason) when the shared data folder is absent, as in a standalone clone."""
    if not path.exists():
        pytest.skip(f"{path} not found: the shared golden/manifest data is not beside this checkout")
    return path


@pytest.fixture
def golden_dir() -> Path:
    return require(GOLDEN)


@pytest.fixture
def manifests_dir() -> Path:
    return require(MANIFESTS)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and busy CI cores make spinning threads slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
