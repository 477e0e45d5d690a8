"""The one error type hf-graft raises for problems a user can cause and fix."""


class HfGraftError(ValueError):
    """A user-fixable problem: bad input, a mismatched checkpoint, a corrupt file.

    The message always names what went wrong and how to fix it. It subclasses ``ValueError`` so
    code that already catches ``ValueError`` around ``from_pretrained`` keeps working.
    """


class BaseModelMismatchError(HfGraftError):
    """A SkillPack applied to a base whose weights fingerprint differs from the one it was made on."""


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)``, cut short for a message: values read from a damaged file can be arbitrarily long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_network_error(error: BaseException) -> bool:
    """True for a failure to reach the Hub (requests' or httpx's connection and timeout errors)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ConnectionError", "TransportError", "Timeout", "OfflineModeIsEnabled"})
