"""Compression passes: fp16, int8, int4 weight-only, low-rank."""
