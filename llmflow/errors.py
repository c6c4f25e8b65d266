"""Errors a user can act on: the CLI prints their one-line message and exits non-zero."""


class LlmflowError(Exception):
    """An error with a one-line message for the user and the exit code it maps to."""

    exit_code = 1


class ConfigError(LlmflowError):
    """A config file, a --set override or a flow parameter is wrong."""

    exit_code = 2


class StackError(LlmflowError):
    """A part of the local stack (Prefect server, Ray head, worker) is down or can't start."""


class StoreError(LlmflowError):
    """The artifact store is unreachable, or something in it is missing or corrupt."""


class RunFailed(LlmflowError):
    """A flow run ended in a state other than Completed."""


class NotPromoted(LlmflowError):
    """The pipeline ran to its end and the gate refused the candidate (the run Completed,
    named NOT_PROMOTED): nothing went wrong, and nothing new is served."""

    exit_code = 3


# The name of a pipeline run's Completed state when its gate refused the candidate: the
# Prefect UI shows it on the run, `llmflow run` exits with NotPromoted's code.
NOT_PROMOTED = "NotPromoted"
