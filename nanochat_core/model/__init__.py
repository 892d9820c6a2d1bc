"""The GPT and its optimizers."""
