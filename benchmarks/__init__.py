"""Benchmarks: each runs this project and a baseline side by side (see docs/benchmarks.md)."""
