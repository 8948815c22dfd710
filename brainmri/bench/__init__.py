"""Benchmarking exported models on this CPU: timing rounds, the ranking rule, FLOPs and GEMM peaks, the timing cache."""
