"""Errors raised by the Segment Anything path: both are ValueErrors, so callers can catch either."""


class SamInputError(ValueError):
    """An image, prompt or option that SAM cannot use (wrong shape, dtype, range or combination)."""


class SamCheckpointError(ValueError):
    """A file or state dict that is not a Segment Anything checkpoint in the official format."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line error reports."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
