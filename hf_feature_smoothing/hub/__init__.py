"""Sharing on the Hub: certified model cards (`model-index` with the certificates), atomic saves, push."""

from .sharing import build_model_card, certificate_eval_results, push_certified_to_hub, save_certified


__all__ = ["build_model_card", "certificate_eval_results", "push_certified_to_hub", "save_certified"]
