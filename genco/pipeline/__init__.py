"""The retraining pipeline's steps and its local runner (``genco pipeline run``, the demo)."""
