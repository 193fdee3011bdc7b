"""mnist_pipeline: the library behind the six DVC stages in stages/ and the mnist-* commands (docs/architecture.md)."""
