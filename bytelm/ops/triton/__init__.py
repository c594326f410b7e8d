"""Fused Triton kernels for bytelm's ops (run on CUDA, or on the CPU under TRITON_INTERPRET=1).

Import the submodules directly (`bytelm.ops.triton.selective_scan`); this package imports nothing
at load time so that `import bytelm.ops` never needs Triton.
"""
