"""Triton kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1), one module per op."""
