"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input: a wrong value, a missing file, an unknown key. The message names the value and what is allowed."""
