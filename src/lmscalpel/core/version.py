"""The package version, importable from every floor (the root package imports all of them)."""

__version__ = "0.1.0"
