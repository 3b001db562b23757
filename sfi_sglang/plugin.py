"""SGLang plugin entry point (group ``sglang.srt.plugins``): registers ``--attention-backend sfi``
and ``--radix-cache-backend sfi`` (selection reuse, on by default under the sfi backend).

sglang calls ``register()`` in the launching process (before it parses arguments)
and again in every scheduler process. It must stay cheap and free of CUDA work.
sglang logs and swallows plugin exceptions, so a failure here is also printed to
stderr, plainly.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("sfi_sglang")

NAME = "sfi"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    try:
        _register()
    except Exception as e:
        print(f"sfi-sglang: registering the '{NAME}' attention backend failed: {e!r}", file=sys.stderr)
        raise
    _registered = True


def _register() -> None:
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([NAME])

    @register_attention_backend(NAME)
    def _create(runner):
        from sfi_sglang.backend import create_sfi_backend

        return create_sfi_backend(runner)

    def _create_radix_cache(ctx):
        from sfi_sglang.radix import create_radix_cache

        return create_radix_cache(ctx)

    if NAME not in registered_radix_cache_backends():
        register_radix_cache_backend(NAME, _create_radix_cache)
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs._handle_attention_backend_compatibility",
        _check_server_args,
        HookType.AFTER,
    )
    HookRegistry.register("sglang.srt.utils.common.support_triton", _support_triton, HookType.AROUND)


def _support_triton(original, backend: str) -> bool:
    """sglang picks Triton or torch helpers by backend name; for sfi, answer as its dense backend."""
    if backend == NAME:
        from sglang.srt.utils.common import is_cpu

        from sfi_sglang.config import SFIConfig

        backend = SFIConfig.from_env().resolve_dense_backend("cpu" if is_cpu() else "cuda")
    return original(backend)


def _check_server_args(result, server_args, *args, **kwargs):
    """After sglang resolves the attention backends: validate what sfi needs, once, in the launcher."""
    from sglang.srt.arg_groups.overrides import attention_backends_of, resolved_view

    prefill, decode = attention_backends_of(resolved_view(server_args))
    if NAME not in (prefill, decode):
        return result
    from sfi_sglang.server_checks import check_server_args

    check_server_args(server_args)
    return result
