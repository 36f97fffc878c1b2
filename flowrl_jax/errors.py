"""One error hierarchy: every error the package raises for bad input derives from FlowRLError.

Each message names the culprit (a config key, a file and line, a tensor, a flag), so
`flowrl-jax` prints it as one line with exit code 2 instead of a traceback. Each class also
derives from the built-in error that callers caught before the hierarchy existed (ValueError
or RuntimeError), so an existing `except ValueError` keeps working.
"""

from __future__ import annotations


class FlowRLError(Exception):
    """Base of the package's errors; the message names the culprit."""


class ConfigError(FlowRLError, ValueError):
    """A config value is unknown, mistyped or impossible; the message names the key."""


class DataError(FlowRLError, ValueError):
    """A data file or row is missing or malformed; the message names the file and line/row."""


class CheckpointError(FlowRLError, ValueError, RuntimeError):
    """A checkpoint is missing, malformed, does not fit the model, or none could be restored."""


class SamplingError(FlowRLError, ValueError):
    """A request cannot be served (too long, bad parameters); the message names the culprit."""


class EvalError(FlowRLError, RuntimeError):
    """Bad eval input (paths, settings, resume mismatch); the message names the culprit."""


class SandboxError(FlowRLError, RuntimeError):
    """The sandbox itself could not be set up: not the program's fault, so no reward is valid."""
