"""fastpeft benchmarks: one harness (``benchmarks.harness``) shared by every adapter method, pytest-benchmark cases
(``pytest benchmarks/``) and the README table (``python -m benchmarks.report``)."""
