"""qconv Triton kernels: one file per op (kernels, a PyTorch reference, an autograd Function)."""
