"""mnist-pipeline: one module per DVC stage (download, preprocess, train, evaluate, export), the few they share, and mnist-predict (predict.py)."""
