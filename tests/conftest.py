"""Suite-wide settings, set before any test module is collected (so subprocess ranks inherit them):

* caches the code writes by default under the user's home go to a temporary folder;
* without CUDA, TRITON_INTERPRET=1, so the Triton kernels run in Triton's CPU interpreter. Triton
  decides at decoration time, for its own library functions (tl.randint, the Philox helpers) as
  for ours, so the variable must be set before anything imports triton: diffusers, transformers
  or bitsandbytes import it early, and a test module setting it at its own import came too late
  whenever one of those was collected first (interpreted kernels then met compiled helpers:
  "Cannot call @triton.jit'd outside of the scope of a kernel").
"""

import os
import shutil
import sys
import tempfile

import torch

_CACHE = tempfile.mkdtemp(prefix="fastflow-test-cache-")
os.environ["FASTFLOW_CACHE"] = _CACHE  # fastflow.models.prompt_cache.default_cache_dir

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)
