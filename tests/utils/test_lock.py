import os
import signal
import socket
import subprocess
import sys
import time

from utils.lock import FolderLock

from ..conftest import ROOT

# Takes the lock, says so, then waits to be killed.
_HOLDER = """
import sys, time
from utils.lock import FolderLock
assert FolderLock(sys.argv[1]).acquire() is None
print("locked", flush=True)
time.sleep(600)
"""


def test_a_held_lock_is_refused_with_its_holder_and_free_again_after_release(tmp_path):
    first, second = FolderLock(tmp_path), FolderLock(tmp_path)
    assert first.acquire() is None
    holder = second.acquire()
    assert holder is not None and holder.startswith(f"pid {os.getpid()} on {socket.gethostname()} since ")
    first.release()
    assert second.acquire() is None
    second.release()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert f"pid {proc.pid} " in FolderLock(tmp_path).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    lock = FolderLock(tmp_path)
    while (holder := lock.acquire()) is not None:  # the kernel drops a dead holder's lock at once; allow for NFS
        assert time.monotonic() < deadline, holder
        time.sleep(0.1)
    assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} ")  # the file now names the new holder
    lock.release()
