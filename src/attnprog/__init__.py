"""attnprog: explain a transformer's attention heads with short Python programs, then put them back."""

__version__ = "0.1.0"
