"""Errors that a user causes and can fix (a bad config key, a missing file): entry points print their
message as one line and exit with status 2 instead of a traceback (`agentflow_jax.cli`)."""


class UserError(Exception):
    """A problem in what the user asked for; the message says what to fix."""
