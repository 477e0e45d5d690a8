"""Checks on what users pass as a model: a local folder or a Hub repo id, said plainly when it is neither.

transformers answers a folder that does not exist with "Repo id must be in the form ..." and a
folder that is not a model with a list of every model type it knows; these checks run first and
name what was expected instead.
"""

import os

from .errors import HfGraftError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _is_hub_id(reference: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(reference)
    except HFValidationError:
        return False
    return not reference.startswith((".", "~"))


def checked_reference(reference: str, what: str = "model", marker: str = "config.json") -> str:
    """``reference`` if it is a folder holding ``marker`` or a well-formed Hub repo id; a clear error otherwise.

    ``what`` names the expected thing in the message ("model", "SkillPack", ...).
    """
    path = os.path.expanduser(str(reference))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, marker)):
            raise HfGraftError(
                f"{reference} is a folder without {marker}: it is not a saved {what} "
                f"(expected a folder written by save_pretrained, or a Hub repo id)."
            )
        return path
    if os.path.exists(path):
        raise HfGraftError(f"{reference} is a file; give a {what} folder or a Hub repo id.")
    if not _is_hub_id(str(reference)):
        raise HfGraftError(f"The folder {reference} does not exist (and it is not a Hub repo id like org/name).")
    return str(reference)


def checked_tokenizer_source(reference: str, what: str = "model") -> str:
    """``reference`` if a tokenizer can be read from it; for a local folder without one, a clear error."""
    path = checked_reference(reference, what)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise HfGraftError(
            f"{reference} holds no tokenizer. Save it beside the {what} "
            "(save_pretrained(folder, tokenizer=tokenizer)), or name one with --tokenizer."
        )
    return path
