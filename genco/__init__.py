"""GenCO: generate the best combination of ad creative elements."""

__version__ = "0.1.0"
