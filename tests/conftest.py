import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from utils.config import run_cli

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
MANIFESTS = SHARED / "manifests"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_script(*args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root in a bare environment: one thread, this checkout's packages."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def refusal(main: Callable[[list[str]], int], args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """A script's command line run in this process (saving a subprocess' imports): assert it is refused with
    exit code 2 and one line on stderr, and return that line. Torch's thread count is restored."""
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, args)
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    return err


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
