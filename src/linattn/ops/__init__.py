"""Pure tensor functions: each algorithm beside its naive reference."""
