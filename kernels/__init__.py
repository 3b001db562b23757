"""Attention kernels of sfi-sglang (package ``sfi_sglang.kernels``), each beside its torch reference."""
