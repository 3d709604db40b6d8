"""defectscope: visual anomaly and surface-defect detection that trains in minutes, offline."""

__version__ = "0.1.0"
