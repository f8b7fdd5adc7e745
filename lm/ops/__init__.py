"""Hand-written kernels: in plain JAX (cheaper dropout masks, custom VJPs that XLA's CPU
backend runs faster than the autodiff of the plain formulation) and in C++ for XLA:CPU
(cpu_*.cc: attention, norms, dense layers, AdamW; built by cpu_kernels.py on first use).

Each op here has a CPU test against the plain path in tests/test_ops.py.
"""
