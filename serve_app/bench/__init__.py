"""Benchmark framework: per-request traces, their summaries, and the reports written from them.

The HTTP load generator ``python -m serve_app.bench`` and the in-process rounds of the engine
benchmarks under ``benchmarks/`` both run on it.
"""
