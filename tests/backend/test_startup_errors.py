"""Bad SFI config, unsupported models and incompatible server flags: one clear error each."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import engine_env

from sfi_sglang.model_check import SFIUnsupportedError, attention_shape
from sfi_sglang.server_checks import check_server_args

PARSE = (
    "from sglang.srt.plugins import load_plugins; load_plugins(); "
    "from sglang.srt.server_args import prepare_server_args; "
    "a = prepare_server_args(['--model-path', sys.argv[1], '--attention-backend', 'sfi', '--device', 'cpu', "
    "*sys.argv[2:]]); "
    "print('PARSED', a.cuda_graph_config.decode.backend, a.max_running_requests)"
)


LAUNCHES = {  # name: SFI_CONFIG and launcher flags
    "sfi": ("", ()),
    "bad topk": ('{"topk": -3}', ()),
    "speculative": ("", ("--speculative-algorithm", "EAGLE")),
}


@pytest.fixture(scope="module")
def launches(tiny_model) -> dict[str, subprocess.CompletedProcess]:
    """The launcher's argument parsing for each of ``LAUNCHES``, in processes run side by side (each spends
    its time importing sglang)."""
    procs = {name: subprocess.Popen([sys.executable, "-c", "import sys; " + PARSE, tiny_model, *flags],
                                    env=engine_env(sfi_config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (sfi_config, flags) in LAUNCHES.items()}
    outs = {name: p.communicate(timeout=600) for name, p in procs.items()}
    return {name: subprocess.CompletedProcess(p.args, p.returncode, *outs[name]) for name, p in procs.items()}


def test_launch_parses_sfi_keeping_decode_graphs(launches):
    proc = launches["sfi"]
    assert "PARSED full 256" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("launch, message", [
    ("bad topk", "SFI config field 'topk' must be > 0, got -3"),
    ("speculative", "sfi does not support speculative decoding (--speculative-algorithm)"),
])
def test_launch_refusal_is_one_line_and_exit_code_1(launches, launch, message):
    """The launcher's argument parsing ends with the refusal's message as its last stderr line, no traceback."""
    proc = launches[launch]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"sfi-sglang: {message}", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count(message) == 1


def server_args(**kw):
    base = dict(speculative_algorithm=None, kv_cache_dtype="auto", enable_unified_memory=False, dcp_size=1,
                max_running_requests=64, page_size=None, pp_size=1, enable_two_batch_overlap=False,
                enable_pdmux=False, enable_dp_attention=False, disaggregation_mode="null",
                enable_torch_compile=False)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("flags, message", [
    ({"speculative_algorithm": "EAGLE"}, "speculative decoding"),
    ({"kv_cache_dtype": "fp8_e4m3"}, "quantized KV cache"),
    ({"enable_unified_memory": True}, "--enable-unified-memory"),
    ({"dcp_size": 2}, "decode context parallelism"),
    ({"page_size": 16}, "--page-size 1 only"),
    ({"enable_two_batch_overlap": True}, "--enable-two-batch-overlap"),
    ({"enable_pdmux": True}, "--enable-pdmux"),
    ({"pp_size": 2}, "pipeline parallelism"),
    ({"enable_dp_attention": True}, "data-parallel attention"),
    ({"disaggregation_mode": "decode"}, "PD-disaggregated decode server"),
    ({"enable_torch_compile": True}, "torch.compile"),
])
def test_incompatible_flags(flags, message, monkeypatch):
    monkeypatch.delenv("SFI_CONFIG", raising=False)
    with pytest.raises(SFIUnsupportedError, match=message):
        check_server_args(server_args(**flags))


def runner_with(*layers, use_mla: bool = False, swa_pool: bool = False):
    model = torch.nn.ModuleList(layers)
    return SimpleNamespace(use_mla_backend=use_mla, model=model,
                           model_config=SimpleNamespace(is_encoder_decoder=False, is_hybrid_swa=swa_pool))


def attn(layer_id=0, **kw):
    from sglang.srt.layers.radix_attention import RadixAttention

    return RadixAttention(num_heads=8, head_dim=64, scaling=0.125, num_kv_heads=2, layer_id=layer_id, **kw)


def grok_attn():
    m = attn()
    m.xai_temperature_len = 1024  # as sglang's Grok sets it from its config
    return m


def sinks_module():
    m = torch.nn.Module()
    m.sinks = torch.nn.Parameter(torch.zeros(8))  # as gpt-oss's attention holds its per-head sink logits
    return m


def test_supported_model_shape():
    shape = attention_shape(runner_with(attn(0), attn(1)))
    assert (shape.num_layers, shape.q_heads, shape.kv_heads, shape.head_dim) == (2, 8, 2, 64)
    assert shape.layer_ids == (0, 1) and shape.windows == {}


def test_sliding_window_hybrid_shape():
    """Gemma 3's layout: sfi serves the full-attention layers; window layers are listed with their window
    (sglang gives full layers a window of None or -1)."""
    shape = attention_shape(runner_with(attn(0, sliding_window_size=511), attn(1, sliding_window_size=-1),
                                        attn(2, sliding_window_size=511), attn(3, sliding_window_size=None)))
    assert (shape.num_layers, shape.layer_ids, shape.windows) == (2, (1, 3), {0: 511, 2: 511})


def test_window_start_matches_sglangs_window_mask():
    """The tail a window layer's decode query attends to, ``[window_start, n)``, is exactly what sglang's
    torch_native backend masks in (its sliding-window convention), at, below and above the window."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from sfi_sglang.backend import window_start

    w = 7
    for n in (1, 5, w, w + 1, w + 2, 40):
        mask = TorchNativeAttnBackend._make_sliding_window_mask(q_len=n, kv_len=n, sliding_window_size=w, device="cpu")
        seen = mask[-1].nonzero().flatten().tolist()  # the last query's row: the decode query
        start = int(window_start(torch.tensor([n]), w))
        assert seen == list(range(start, n)), n


@pytest.mark.parametrize("runner, message", [
    (lambda: runner_with(attn(), use_mla=True), "MLA"),
    (lambda: runner_with(attn(0, sliding_window_size=128), attn(1, sliding_window_size=128)),
     "every attention layer of this model is sliding-window"),
    (lambda: runner_with(attn(0), attn(1, sliding_window_size=128), swa_pool=True), "--disable-hybrid-swa-memory"),
    (lambda: runner_with(attn(is_cross_attention=True)), "causal decoder self-attention"),
    (lambda: runner_with(), "no attention layers"),
    (lambda: runner_with(attn(3), attn(7)), "every layer to be an attention layer"),
    (lambda: runner_with(attn(use_irope=True)), "chunked local attention"),
    (lambda: runner_with(attn(pos_encoding_mode="ROPE_LLAMA")), "position encoding ROPE_LLAMA"),
    (lambda: runner_with(attn(logit_cap=30.0, logit_capping_method="clamp")), "logit capping 'clamp'"),
    (lambda: runner_with(grok_attn()), "attention temperature"),
    (lambda: runner_with(attn(), sinks_module()), "learned attention sinks"),
])
def test_unsupported_models(runner, message):
    with pytest.raises(SFIUnsupportedError, match=message):
        attention_shape(runner())


def test_dense_layers_beyond_the_model():
    from sfi_sglang.backend import SFIBackend
    from sfi_sglang.config import SFIConfig, SFIConfigError

    with pytest.raises(SFIConfigError, match="'dense_layers' \\(3\\) exceeds the model's 2 full-attention layers"):
        SFIBackend(runner_with(attn(0), attn(1)), None, SFIConfig(dense_layers=3))
