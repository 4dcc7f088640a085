"""bench/ is a pytest-benchmark suite, outside the default test run (pyproject's testpaths is tests/)."""
import os
import tempfile

import pytest

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "metric_kernels_bench_inductor"))


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("benchmark"):
        skip = pytest.mark.skip(reason="pytest-benchmark is not installed (pip install pytest-benchmark)")
        for item in items:
            item.add_marker(skip)
