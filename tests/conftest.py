"""Test session set-up: 8 fake CPU devices for sharding tests, float32 matmuls."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

# Exact float32 matmuls on CPU so parity tests against PyTorch are meaningful.
jax.config.update("jax_default_matmul_precision", "highest")
