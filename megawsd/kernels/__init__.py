"""megawsd.kernels."""
