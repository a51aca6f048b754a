"""The package version, in a bottom-layer module so that any layer can read it without
importing the package root (which imports the workflows). Keep it equal to
``[project] version`` in pyproject.toml."""

__version__ = "0.1.0"
