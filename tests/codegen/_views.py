"""Non-contiguous views of a (33, 40) base tensor, shared by the kernel tests."""

NONCONTIGUOUS = {
    "transposed": lambda b: b.t(),
    "step_slice": lambda b: b[:, ::3],
    "slice_transposed": lambda b: b[1::2, 2::5].t(),
    "permuted3d": lambda b: b.view(3, 11, 40).permute(2, 0, 1),
}
