"""Exceptions that carry a message meant for the user (printed without a traceback)."""


class PTLError(Exception):
    """An error the user can fix: bad input, bad configuration, missing files."""


class ConfigError(PTLError):
    """A configuration key or value is wrong."""


class DatasetError(PTLError):
    """An input folder, labels file or dataset layout is unusable."""


class ImageError(PTLError):
    """One image cannot be decoded; the stages skip it and report the reason."""


class FeatureFileError(PTLError):
    """A feature file is missing, incomplete or inconsistent with another one."""


class BundleError(PTLError):
    """A saved model bundle cannot be loaded or does not match the features given."""
