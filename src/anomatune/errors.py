"""Errors a user can act on: each message names the file or setting and what to do.

The CLI prints them as one line (no traceback) and exits with code 2; the library
raises them as usual.
"""


class AnomatuneError(Exception):
    """Base class of every error that is the input's fault rather than a bug."""


class DataError(AnomatuneError, ValueError):
    """A folder, image or mask cannot be used as given."""


class BackboneError(AnomatuneError, ValueError):
    """A backbone name, layer choice or weights file cannot be used."""


class SettingsError(AnomatuneError, ValueError):
    """A setting (from Python, YAML or the command line) has a value it cannot take."""


class NotFittedError(AnomatuneError, AttributeError):
    """A detector or pipeline was used before ``fit`` (scikit-learn's name for it)."""


class RunFolderError(AnomatuneError):
    """A run folder is missing, of another kind or version, incomplete, or in use."""


def is_fitted(estimator: object) -> bool:
    """Whether ``estimator`` has its ``fitted_attribute``, the one its fit sets last (scikit-learn's convention)."""
    return hasattr(estimator, estimator.fitted_attribute)


def check_is_fitted(estimator: object, advice: str) -> None:
    """:class:`NotFittedError`, saying to ``advice``, unless ``estimator`` is fitted: the detectors' and the pipeline's one check."""
    if not is_fitted(estimator):
        raise NotFittedError(f"this {getattr(estimator, 'name', type(estimator).__name__)} is not fitted: {advice}")
