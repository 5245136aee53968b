"""Benchmarks and reports of the DCAMA attention kernels (run as scripts: `python bench/<name>.py`)."""
