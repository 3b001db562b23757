"""TEST-ONLY stand-in for ``sgl_kernel`` so that sglang's CPU engine runs on a machine
without a CPU build of sgl-kernel (PyPI ships CUDA builds only). Never installed by
the package. It implements the one op the CPU decode path calls; every other name
raises when called, so a path that needs a real kernel fails loudly.
"""


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len):
    offset = 0
    for req, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        req_to_token[req, start:end] = out_cache_loc[offset : offset + end - start].to(req_to_token.dtype)
        offset += end - start


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available in the CPU test stub")

    return _missing
