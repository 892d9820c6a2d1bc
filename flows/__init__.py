"""Prefect wiring for the `nanochat` flow. Stages live in nanochat_core; nothing here imports torch."""
