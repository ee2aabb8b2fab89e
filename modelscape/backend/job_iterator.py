"""The original's API: ``modelscape.backend.job_iterator.main`` is ``modelscape.runner.main``."""

from modelscape.runner import main, plan

__all__ = ["main", "plan"]
