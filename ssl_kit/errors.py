"""User-facing errors: the CLI prints their message (which names the fix) without a traceback."""


class UserError(Exception):
    """Bad input that the user can fix: the message says how."""


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stops before the bad step touches the weights."""
