"""Benchmarks: each prints JSON and compares configurations side by side in one run (the machine is noisy)."""
