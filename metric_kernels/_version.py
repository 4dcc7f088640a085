"""The package's one version: pyproject.toml reads it (setuptools dynamic version) and metric_kernels.__version__
re-exports it. CHANGELOG.md has a section for it."""
__version__ = "0.1.0"
