"""Registering a new method with PEFT 0.21, whose `PeftType` enum is closed (stack notes §4)."""

from peft.utils import PeftType


PEFT_TYPE_NAME = "FEATURE_BOOSTER"
PEFT_METHOD_NAME = "feature_booster"
DEFAULT_ADAPTER_NAME = "default"  # PEFT's: what `get_peft_model` / `PeftModel.from_pretrained` name an adapter
PARAMETER_PREFIX = "fs_booster_"  # unique: PEFT freezes / saves parameters by substring match on it


def extend_peft_type(name: str) -> None:
    """Add `name` to `PeftType` (idempotent). `EnumType.__setattr__` refuses new members, so go through `type`."""
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
