"""Benchmarks (`memlm bench ...`)."""
