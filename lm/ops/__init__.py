"""Hand-written kernels in plain JAX: cheaper dropout masks and custom VJPs that XLA's
CPU backend runs faster than the autodiff of the plain formulation.

Each op here has a CPU test against the plain path in tests/test_ops.py.
"""
