"""SGLang plugin entry point (group ``sglang.srt.plugins``): registers ``--attention-backend sfi``
and ``--radix-cache-backend sfi`` (selection reuse, on by default under the sfi backend).

sglang calls ``register()`` in the launching process (before it parses arguments)
and again in every scheduler process. It must stay cheap and free of CUDA work.
sglang logs and swallows plugin exceptions, so a failure here is also printed to
stderr, plainly. A bad SFI config or server flag found while the launcher parses its command
line ends it with one line on stderr and exit code 1.
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
    HookRegistry.register("sglang.srt.server_args.prepare_server_args", _exit_on_refusal, HookType.AROUND)
    HookRegistry.register("sglang.srt.utils.common.support_triton", _support_triton, HookType.AROUND)
    HookRegistry.register(
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes",
        _reserve_state_bytes,
        HookType.AFTER,
    )


def _exit_on_refusal(original, *args, **kwargs):
    """sglang's command-line launchers (``sglang serve``, ``python -m sglang.launch_server``) parse
    their arguments here, and ``_check_server_args`` runs inside: a refusal ends the launcher with
    its message, not under a traceback. Engines built in-process (``sglang.Engine``) still raise it."""
    from sfi_sglang.config import SFIConfigError
    from sfi_sglang.model_check import SFIUnsupportedError

    try:
        return original(*args, **kwargs)
    except (SFIConfigError, SFIUnsupportedError) as e:
        print(f"sfi-sglang: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _support_triton(original, backend: str) -> bool:
    """sglang picks Triton or torch helpers by backend name; for sfi, answer as its dense backend."""
    if backend == NAME:
        from sglang.srt.utils.common import is_cpu

        from sfi_sglang.config import SFIConfig

        backend = SFIConfig.from_env().resolve_dense_backend("cpu" if is_cpu() else "cuda")
    return original(backend)


def _reserve_state_bytes(available: int, configurator, *args, **kwargs) -> int:
    """sglang sizes the KV cache from the bytes this returns: under sfi, take the backend's static
    GPU state out of it first, so sfi fits where dense fits at the same --mem-fraction-static."""
    if not _serves_sfi(configurator.server_args) or configurator.is_draft_worker:  # resolved args
        return available
    from sfi_sglang.config import SFIConfig
    from sfi_sglang.memory import static_bytes
    from sfi_sglang.model_check import attention_shape

    from sglang.srt.mem_cache.allocation_sizing import get_req_to_token_extra_context_len

    sa = configurator.server_args
    rows = (sa.max_running_requests or 0) + 1  # sglang's req pool: one spare row
    context = configurator.model_config.context_len + get_req_to_token_extra_context_len(sa)  # its row width
    need = static_bytes(SFIConfig.from_env(), attention_shape(configurator), rows, configurator.model_dtype, context)
    logger.info("SFI: %.1f MiB of the KV-cache budget reserved for selection state", need / 2**20)
    return available - need


def _serves_sfi(cfg) -> bool:
    """Whether sfi is the prefill or decode backend of ``cfg`` (server args, or a view of them)."""
    from sglang.srt.arg_groups.overrides import attention_backends_of

    return NAME in attention_backends_of(cfg)


def _check_server_args(result, server_args, *args, **kwargs):
    """After sglang resolves the attention backends: validate what sfi needs, once, in the launcher."""
    from sglang.srt.arg_groups.overrides import resolved_view

    if not _serves_sfi(resolved_view(server_args)):
        return result
    from sfi_sglang.server_checks import check_server_args

    check_server_args(server_args)
    return result
