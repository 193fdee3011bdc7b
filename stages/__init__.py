"""mnist-pipeline: one module per DVC stage (download, preprocess, train, evaluate, export) and the few they share."""
