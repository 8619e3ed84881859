"""The ``genco`` command line: a thin shell over the library (``genco = genco.cli:main``)."""

from genco.cli.main import main

__all__ = ["main"]
