"""Performance tools over the library: profiling a training step, timing kernels (nbp-bench-* use them)."""
