"""``PeftType.SKILLPACK``: the one place where hf-graft extends peft's closed enum.

peft's ``register_peft_method`` accepts only names that ``PeftType`` already has, and its
config loading looks types up by value, so the SkillPack needs a real member of that enum (a
``str`` whose ``.value.lower()`` is ``"skillpack"``, as transformers' peft integration expects).
Python enums cannot gain members through their public API; this adds one exactly as the enum
machinery stores its own (member maps and class attribute), once, idempotently.
"""

from peft.utils.peft_types import PeftType


def _extend(enum_cls, name: str):
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    return member


SKILLPACK = _extend(PeftType, "SKILLPACK")
