"""One module per DAG node: `run(cfg, ...) -> ref`, `main(argv)`, and a `__main__` guard."""
