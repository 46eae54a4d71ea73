"""The one exception type a user sees: its message is printed on one line and the CLI exits 2."""


class UserError(Exception):
    """Bad input the user can fix: a config key, a file, a value. Never a bug in megatronlite."""
