"""defectscope: visual anomaly and surface-defect detection that trains in minutes, offline."""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("defectscope")  # the installed distribution's version (pyproject.toml)
except _PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0.2.0"
