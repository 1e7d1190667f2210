"""Deprecated aliases of renamed public names: the old name keeps working, returns the same object and warns once."""

import warnings
from collections.abc import Callable


_WARNED: set[tuple[str, str]] = set()


def deprecated_aliases(namespace: dict, aliases: dict[str, str], since: str = "0.2.0") -> Callable[[str], object]:
    """A module `__getattr__` (PEP 562) serving each old name in `aliases` (old → new, both in `namespace`, the
    module's `globals()`) with a `FutureWarning` the first time it is used."""
    module = namespace["__name__"]

    def __getattr__(name: str):
        if name not in aliases:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new = aliases[name]
        if (module, name) not in _WARNED:
            _WARNED.add((module, name))
            warnings.warn(f"`{module}.{name}` was renamed `{new}` in {since}; the old name is an alias that will be "
                          "removed in a later release.", FutureWarning, stacklevel=2)
        return namespace[new]

    return __getattr__


def warn_renamed(owner: str, old: str, new: str, since: str = "0.2.0") -> None:
    """The `FutureWarning` of a renamed attribute `owner.old` → `owner.new`, once per process."""
    if (owner, old) not in _WARNED:
        _WARNED.add((owner, old))
        warnings.warn(f"`{owner}.{old}` was renamed `{new}` in {since}; the old name is an alias that will be removed "
                      "in a later release.", FutureWarning, stacklevel=3)


__all__ = ["deprecated_aliases", "warn_renamed"]
