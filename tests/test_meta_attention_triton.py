"""The Triton Meta-Attention kernel: interpreted on CPU (CI), compiled on a CUDA GPU when there is one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_triton_meta_attention_matches_float64():
    import torch

    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # Triton reads it at import: hence a fresh process
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(here / "interpreted_meta_attention.py")],
                         cwd=here, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
