"""peakc's version, at the bottom of the package: `peakc.__version__` and artifact manifests
read it from here (the runtime cannot import the package root, which sits above it)."""

__version__ = "0.1.0"
