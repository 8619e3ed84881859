"""Training: reward-model fitting and attribution, and assembling a complete bundle."""
