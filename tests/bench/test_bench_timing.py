"""The decode benchmarks' step timing (``benchmarks/engine_decode.py``) and byte model: a step time comes from the
first and last streamed chunk of one send, and implausible step times are refused or flagged."""

import math

import pytest

from engine_decode import TimingError, check_step_times, decode_step_time


def test_step_time_spans_the_first_and_last_chunk():
    # first chunk: the prefill's token; then 64-token chunks; the last holds all 513 tokens
    chunks = [(10.0, 1), (10.3, 65), (12.0, 513)]
    assert decode_step_time(chunks) == pytest.approx(2.0 / 512)


@pytest.mark.parametrize("chunks", [
    [(10.0, 1)],  # one chunk: nothing timed
    [(10.0, 5), (11.0, 5)],  # no tokens in between
    [(10.0, 1), (10.0, 513)],  # no time in between
    [(10.0, 1), (9.9, 513)],  # the clock went backwards
])
def test_step_time_refuses_what_cannot_be_a_decode(chunks):
    with pytest.raises(TimingError):
        decode_step_time(chunks)


@pytest.mark.parametrize("runs", [[-0.00184, 0.0051, 0.0052], [0.0, 0.005, 0.005], [math.nan, 0.005, 0.005], []])
def test_non_positive_step_times_are_refused(runs):
    with pytest.raises(TimingError):
        check_step_times(runs)


def test_a_send_far_from_the_median_is_flagged():
    assert check_step_times([0.00512, 0.00513, 0.00511]) == []
    (warning,) = check_step_times([0.00191, 0.00521, 0.00526])  # 63% under the median
    assert warning.startswith("send 0: 1.910 ms per step") and "-63.3%" in warning
    assert check_step_times([0.00191, 0.00521, 0.00526], spread=None) == []


def test_a_step_faster_than_its_bytes_is_flagged():
    # a step that must move 14.26 GB at 4.25 TB/s takes at least 3.35 ms
    floor_s = 14.26e9 / 4.25e12
    assert check_step_times([0.00512], floor_s) == []
    (warning,) = check_step_times([0.0030], floor_s)
    assert "under the 3.355 ms its bytes take" in warning


def test_bytes_model_reads_a_window_layer_over_its_window():
    """The byte ideal of a sliding-window hybrid: a window layer reads its window, a full layer the
    context (sfi: the memory on fast steps); short contexts read themselves everywhere."""
    from bench_decode import tokens_read

    from sfi_sglang.config import SFIConfig
    from sfi_sglang.dummy_model import PRESETS

    qwen, gemma = PRESETS["qwen3-4b"], PRESETS["gemma3-4b"]
    assert tokens_read(qwen, 32768, 512) == 32768 + 256
    assert tokens_read(gemma, 32768, 512) == pytest.approx((5 * (32768 + 256) + 29 * 1024) / 34)  # 5 full of 34
    assert tokens_read(gemma, 512, 0) == 512
    sfi = SFIConfig().to_dict()
    kept = 4 + 3072 + 1024 + 16  # sinks + topk + recent + half a refresh interval
    fast = (32768 / 32 + kept * 31 / 32 + 256)
    assert tokens_read(gemma, 32768, 512, sfi, 32) == pytest.approx((5 * fast + 29 * 1024) / 34)
