"""The one error type hf-graft raises for problems a user can cause and fix."""


class HfGraftError(ValueError):
    """A user-fixable problem: bad input, a mismatched checkpoint, a corrupt file.

    The message always names what went wrong and how to fix it. It subclasses ``ValueError`` so
    code that already catches ``ValueError`` around ``from_pretrained`` keeps working.
    """
