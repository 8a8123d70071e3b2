"""Training side of mfserve: data loading, encoders, model fitting, evaluation and artifacts."""
