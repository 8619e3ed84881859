"""Inference: a bundle bound to its catalog, answering recommendations (``Predictor``)."""
