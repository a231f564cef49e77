"""The library version, in a module of its own so that the file rooms can record it in what they
write without importing the package face (``alphatune/__init__.py`` imports them)."""

__version__ = "0.1.0"
