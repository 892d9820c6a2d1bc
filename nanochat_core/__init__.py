"""nanochat-flow's library: stages, model, data and tracking. Never imports Prefect."""

__version__ = "0.1.0"
