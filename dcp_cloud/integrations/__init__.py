"""Adoption without code changes in the training stack: :func:`install` hooks DCP's storage
auto-detection, :mod:`.autoinstall` does it from an environment variable, and
:mod:`.lightning` holds the PyTorch Lightning strategies. Importing this package imports no
framework and no cloud library."""

from .install import CLOUD_SCHEMES, cloud_url, install, is_installed, uninstall

__all__ = ["CLOUD_SCHEMES", "cloud_url", "install", "is_installed", "uninstall"]
