"""Strict JAX configuration for the whole suite: float64, and no silent broadcasting or promotion.

XLA's backend optimisation level is lowered for the tests only: the suite is
dominated by compile time, and correctness checks do not need optimised
kernels (benchmarks run with the defaults).
"""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Four CPU devices (before any backend starts), for the data-parallel tests
# (test_sharding.py); every other test runs on the default device as before.
jax.config.update("jax_num_cpu_devices", 4)
# Full float32 matrix products on every backend: on NVIDIA GPUs XLA would
# otherwise use TF32 tensor cores for float32 (about 1e-3 relative error), which
# the float32 comparisons are not about.
jax.config.update("jax_default_matmul_precision", "float32")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """Clears JAX's caches after each test module.

  Each compiled XLA:CPU program holds about 60 memory mappings (its kernels'
  code) until JAX drops it. Linux allows 65530 per process (vm.max_map_count),
  and past that LLVM fails every compile with "Cannot allocate memory". A
  worker of this suite reached 28,500 mappings (2026-11-23) and stays near
  1,000 with this. The suite's time did not change (modules share few programs).
  """
  yield
  jax.clear_caches()
