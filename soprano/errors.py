"""The exceptions that the engine raises on purpose."""


class SopranoError(Exception):
    """Base class: every error the engine raises deliberately derives from it."""


class ModelLoadError(SopranoError):
    """A checkpoint is missing, incomplete, corrupt or unreachable."""


class BackendUnavailableError(SopranoError):
    """The requested backend or device cannot run on this machine."""
