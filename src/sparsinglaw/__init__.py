"""sparsinglaw: measure, train for, fit and exploit activation sparsity (arXiv 2411.02335)."""

__version__ = "0.1.0"
