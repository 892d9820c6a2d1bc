"""Base-model evaluation: the CORE metric (DCLM's in-context-learning suite) and its eval bundle."""

from nanochat_core.evaluation.core import core_metrics, evaluate_core, format_core_csv, format_core_table

__all__ = ["core_metrics", "evaluate_core", "format_core_csv", "format_core_table"]
