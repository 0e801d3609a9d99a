"""A user's module whose own code fails as it is imported."""
raise RuntimeError("CUDA driver not found")
