"""Benchmarks (``biomedgpt bench NAME``): scripts that measure and print figures."""
