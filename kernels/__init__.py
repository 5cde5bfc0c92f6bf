"""Hand-written Triton kernels, installed as ``sapiens2.kernels``.

Kernels know nothing of the model: each module takes plain tensors and launches kernels. The op
layer (``sapiens2.ops``) validates inputs, picks a backend and registers autograd.
"""
