"""Errors a user can act on: each message names the file or setting and what to do.

The CLI prints them as one line (no traceback); the library raises them as usual.
"""


class AnomatuneError(Exception):
    """Base class of every error that is the input's fault rather than a bug."""


class DataError(AnomatuneError, ValueError):
    """A folder, image or mask cannot be used as given."""


class BackboneError(AnomatuneError, ValueError):
    """A backbone name, layer choice or weights file cannot be used."""
