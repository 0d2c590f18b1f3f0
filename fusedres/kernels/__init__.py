"""Triton kernels. Imported lazily by fusedres.ops, so `import fusedres` never needs triton."""
