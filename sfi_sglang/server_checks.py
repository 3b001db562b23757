"""Server flags the sfi backend cannot serve: one clear error each, at startup, in the launcher."""

from __future__ import annotations

import logging

from sfi_sglang.config import SFIConfig
from sfi_sglang.model_check import SFIUnsupportedError

logger = logging.getLogger("sfi_sglang")

# SFI keeps a selection per running request (layers x KV heads x topk positions);
# sglang's own default (up to 4096 requests on small models) would cost GBs of it.
DEFAULT_MAX_RUNNING_REQUESTS = 256


def check_server_args(server_args) -> None:
    SFIConfig.from_env()  # raises SFIConfigError naming the bad field
    if server_args.speculative_algorithm is not None:
        raise SFIUnsupportedError("sfi does not support speculative decoding (--speculative-algorithm)")
    kv_dtype = str(server_args.kv_cache_dtype or "auto")
    if kv_dtype.startswith("fp8") or kv_dtype.startswith("fp4"):
        raise SFIUnsupportedError(f"sfi does not support a quantized KV cache (--kv-cache-dtype {kv_dtype})")
    if getattr(server_args, "enable_unified_memory", False):
        raise SFIUnsupportedError("sfi does not support --enable-unified-memory (virtual KV slot ids)")
    if (server_args.page_size or 1) > 1:  # sglang's paged allocator has no CPU path, so this is unmeasured
        raise SFIUnsupportedError(f"sfi is verified with --page-size 1 only (got --page-size {server_args.page_size})")
    if server_args.dcp_size and server_args.dcp_size > 1:
        raise SFIUnsupportedError("sfi does not support decode context parallelism (--dcp-size > 1)")
    for flag in ("enable_two_batch_overlap", "enable_pdmux"):
        # sglang builds several attention backends, one per micro-batch or stream group; each would
        # keep its own selections, so a request's fast step could read another instance's state
        if getattr(server_args, flag, False):
            raise SFIUnsupportedError(f"sfi does not support --{flag.replace('_', '-')} (several attention "
                                      "backend instances would each keep their own selections)")
    if (server_args.pp_size or 1) > 1:
        raise SFIUnsupportedError(f"sfi is verified without pipeline parallelism only (got --pp-size {server_args.pp_size})")
    if getattr(server_args, "disaggregation_mode", "null") == "decode":
        # requests arrive without a prefill here, so nothing would start their selection state
        raise SFIUnsupportedError("sfi does not support a PD-disaggregated decode server (--disaggregation-mode decode)")
    if getattr(server_args, "enable_dp_attention", False):
        raise SFIUnsupportedError("sfi is verified without data-parallel attention only (--enable-dp-attention)")
    if getattr(server_args, "enable_torch_compile", False):
        raise SFIUnsupportedError("sfi is verified without torch.compile only (--enable-torch-compile)")
    if server_args.max_running_requests is None:
        server_args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
        logger.info("SFI: --max-running-requests defaults to %d under sfi", DEFAULT_MAX_RUNNING_REQUESTS)
    if server_args.radix_cache_backend is None and not server_args.disable_radix_cache:
        server_args.radix_cache_backend = "sfi"  # sglang's default cache, plus selection records
