def version() -> str:
    """The crate version of the compiled extension."""
