"""The package version, read by ``pyproject.toml`` (scikit-build-core's regex provider) and by
``sigma_fast.__version__``: one place."""

__version__ = "0.1.0"
