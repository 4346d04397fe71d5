"""The application layer: the command line, checkpoints and output safety, datasets, the
benchmark harness, shared experiment recipes and the runtime (compilation cache, logs)."""
