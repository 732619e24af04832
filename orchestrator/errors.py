"""The project's user-facing error types.

Anything the user can fix (a config key, a command-line argument, a bad
entry point) raises :class:`ConfigError`; the CLI turns it into one message
and exit code 2 before anything is started.
"""


class ConfigError(Exception):
    """Bad user input: the message names the key and how to fix it."""


class ClusterError(Exception):
    """The cluster cannot run the job (unreachable Ray, resources that never free up).

    Not the user's config and not a training failure: the CLI prints the
    message and exits 1 without a traceback.
    """
