"""User-facing errors: one line that names the key, file or value. Anything else is a bug."""


class EdgecvError(Exception):
    """A mistake the user can fix; the CLI prints `error: <message>` and exits with code 2."""

    exit_code = 2
