"""The toolkit's user-facing errors: the CLI prints any of these as one line and exits non-zero."""


class OffsiteError(Exception):
    """Bad input a user can fix; the message names the problem and the fix."""


class LayoutError(OffsiteError, ValueError):
    """An impossible or malformed L-K-R layout."""


class UnsupportedModelError(OffsiteError, ValueError):
    """The model is not a decoder-only causal LM whose blocks form one ModuleList."""


class ArtifactError(OffsiteError):
    """An EmulatorBundle or AdapterPackage failed validation (untrusted input refused)."""


class DataError(OffsiteError):
    """A corpus or task file cannot be used as given."""
