"""Sharing on the Hub: certified model cards (`model-index` with the certificates), atomic saves, push."""

from .sharing import (
    attack_eval_results,
    build_model_card,
    certificate_eval_results,
    push_certified_to_hub,
    save_certified,
)


__all__ = ["attack_eval_results", "build_model_card", "certificate_eval_results", "push_certified_to_hub", "save_certified"]
