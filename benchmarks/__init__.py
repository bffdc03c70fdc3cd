"""Benchmarks: our server vs the model's ceiling and vs peer servers (`python -m benchmarks.run`)."""
