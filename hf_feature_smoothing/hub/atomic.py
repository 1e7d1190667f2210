"""Atomic checkpoint folders; moved to [`hf_feature_smoothing.utils.atomic`], re-exported here."""

from ..utils.atomic import OWNED_PREFIXES, atomic_directory, recover, recover_if_local


__all__ = ["OWNED_PREFIXES", "atomic_directory", "recover", "recover_if_local"]
