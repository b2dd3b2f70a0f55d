"""The package version (read by setup.cfg and recorded in every bundle)."""

__version__ = "0.1.0"
