"""Logging goes through `transformers.logging` when it is installed (it always is for the model code)."""

import logging


def get_logger(name: str) -> logging.Logger:
    """Return the library logger, shared with `transformers.logging` verbosity controls."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # statistics-only use without transformers
        return logging.getLogger(name)
    return hf_logging.get_logger(name)
