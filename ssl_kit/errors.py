"""User-facing errors: the CLI prints their message (which names the fix) without a traceback."""
from __future__ import annotations

from pytorch_lightning.utilities.exceptions import MisconfigurationException


class UserError(Exception):
    """Bad input that the user can fix: the message says how."""


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stops before the bad step touches the weights."""


def find_user_error(err: BaseException) -> UserError | None:
    """The UserError behind ``err``: jsonargparse re-raises errors from ``__init__`` as a ValueError. Lightning's
    own configuration errors (``--trainer.devices 0``, an accelerator this machine lacks) count as one too."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        if isinstance(err, MisconfigurationException):
            return UserError(f"trainer settings: {err}")
        seen.add(id(err))
        err = err.__cause__
    return None
