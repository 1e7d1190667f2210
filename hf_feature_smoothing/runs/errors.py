"""`RunError` lives in `utils.errors` (below the runs, so locks and recipes can raise it); re-exported here."""

from ..utils.errors import RunError


__all__ = ["RunError"]
