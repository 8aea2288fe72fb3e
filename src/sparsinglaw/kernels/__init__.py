"""Optional GPU kernels (Triton). Imported lazily: the package never needs Triton to run."""
