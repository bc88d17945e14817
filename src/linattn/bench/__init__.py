"""Benchmarks: speed and memory of linattn against exact attention (never run by pytest)."""
