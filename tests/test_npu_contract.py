"""torch_npu's contract, checked on any machine: xytune's NPU paths run against a CPU stand-in of torch_npu.

The stand-in (tests/npu_standin/torch_npu) must be what ``import torch_npu`` finds, before torch or xytune load,
so tests/npu_contract_paths.py runs in a fresh interpreter with it first on PYTHONPATH. On an Ascend host the
real torch_npu is exercised by tests/test_accelerators.py instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_npu_paths_against_the_torch_npu_standin():
    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(here / "npu_standin")] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(here / "npu_contract_paths.py")],
                         cwd=here, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout and "failed" not in run.stdout, run.stdout[-3000:]
