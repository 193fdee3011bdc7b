"""The six DVC stages, one script each (`python -m stages.<name>`); what they share lives in mnist_pipeline."""
