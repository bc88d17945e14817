"""Benchmarks: speed and memory of linattn against exact attention and other libraries,
the approximation experiment, and the report (``linattn bench|approx|report``). The
tests run them only on tiny sizes, to check the files they write and the statistics
(:mod:`linattn.bench.checks`); no test asserts a timing."""
