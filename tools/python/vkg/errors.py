"""Exceptions that need neither NumPy nor PyTorch to import."""


class ExportError(Exception):
    """A module, function or method the exporter cannot convert. The message names the op and
    the module path where it was met."""
