"""Numba kernels: pure functions of numpy arrays that write into `out` arguments.

Shapes: T tokens, D emb, H q-heads, G kv-heads, d key size, E experts, F expert ffn,
V vocab, S cache rows. Weights are input-major: y = x @ W, W [R in, C out], int8 with float32
scales s [nb, C] over nb contiguous row blocks.
"""
