import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
MANIFESTS = SHARED / "manifests"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_script(*args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root in a bare environment: one thread, this checkout's packages."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


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
