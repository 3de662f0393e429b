"""Suite-wide settings: caches the code writes by default under the user's home go to a
temporary folder instead (set before any test runs, so subprocess ranks inherit it)."""

import os
import shutil
import tempfile

_CACHE = tempfile.mkdtemp(prefix="fastflow-test-cache-")
os.environ["FASTFLOW_CACHE"] = _CACHE  # fastflow.models.prompt_cache.default_cache_dir


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)
