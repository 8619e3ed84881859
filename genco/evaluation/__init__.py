"""Evaluation: metrics, off-policy values, the deploy gate, the HTML report, baselines."""
