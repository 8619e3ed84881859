"""Simulated worlds with known ground truth (synthetic and AES-based)."""
