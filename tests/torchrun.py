"""Run a Python snippet as 2 processes under ``torchrun --standalone`` (gloo on CPU), as a user's
launch line would, for the multi-process tests.

The snippet gets ``sys.argv[1:]`` = [tests folder, checkout, *args]. One thread per process, as each
torchrun worker of a 2-core machine has. Rarely (seen 1 run in ~40 here) a worker aborts *after*
its work, at teardown inside PyTorch's gloo process group ("terminate called without an active
exception", SIGABRT); that one signature is retried once, anything else fails at once.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import conftest; "
TEARDOWN_ABORT = "terminate called without an active exception"


def run_two_processes(snippet, *args, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           sys.executable, "-c", PREFIX + snippet, os.path.join(ROOT, "tests"), ROOT, *map(str, args)]
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode == 0 or TEARDOWN_ABORT not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
