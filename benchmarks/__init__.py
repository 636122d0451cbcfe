"""Benchmarks (not tests): run them by hand or via ``paystream bench``."""
