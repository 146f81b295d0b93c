"""Compute backends. `cpu` runs everything with numba kernels and numpy's BLAS."""
