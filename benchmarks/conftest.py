"""Session fixtures for ``pytest benchmarks/``.

With timing on (the default) the cases run the issue's reference workload; with ``--benchmark-disable`` (CI smoke)
they run a tiny model through every code path in seconds. ``FASTPEFT_BENCH_SCALE=full|smoke`` overrides either,
``FASTPEFT_BENCH_DEVICE`` picks the device (default: CUDA when available), ``FASTPEFT_BENCH_THREADS`` the CPU
threads (default 1, as the reference workload specifies).
"""

import pytest

from benchmarks import harness


@pytest.fixture(scope="session")
def bench(request) -> harness.Bench:
    scale = harness.smoke_or_full(request.config.getoption("benchmark_disable"))
    return harness.Bench(scale)

