"""Benchmarks run by ``make bench`` (see docs/benchmarks.md)."""
