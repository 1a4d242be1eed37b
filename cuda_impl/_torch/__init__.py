"""Internals of the torch backend (`cuda_impl.torch_impl` is the public face).

Modules follow the kernels they stand for: `switches` (one flag per fault),
`routes` (effective experts and the token→slot map), `passes` (the counting
and scatter passes of one slot row), `launch` (align and the per-slot LoRA
launches), `ep` (the EP remap), `args` (argument checks).
"""
