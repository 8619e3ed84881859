"""Serving: REST request parsing, the .mar/KServe layout, a local TorchServe."""
