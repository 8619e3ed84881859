"""Data: the input contract (catalog, constraints, impression columns), validation, storage."""
