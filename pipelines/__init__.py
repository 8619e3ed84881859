"""The retraining pipeline (KFP v2)."""
