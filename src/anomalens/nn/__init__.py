"""Tensor building blocks shared by the methods: nearest-neighbour memory, map operations, module state."""
