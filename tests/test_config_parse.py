import json

import pytest

from sfi_sglang.config import ENV_VAR, SFIConfig, SFIConfigError


@pytest.mark.parametrize("fields, field", [
    ({"topk": 0}, "topk"), ({"sinks": -1}, "sinks"), ({"recent": -1}, "recent"),
    ({"max_fast_steps": 0}, "max_fast_steps"), ({"min_refresh_gap": 200}, "min_refresh_gap"),
    ({"prefill_queries": 17}, "prefill_queries"), ({"alpha": 0}, "alpha"), ({"alpha": 1.5}, "alpha"),
    ({"prior_lambda_max": 1.0}, "prior_lambda_max"), ({"dense_backend": "fa9"}, "dense_backend"),
    ({"boundary_ids": [1, -2]}, "boundary_ids"), ({"topk": "big"}, "topk"), ({"sinks": True}, "sinks"),
    ({"topk_per_head": 5}, "topk_per_head"),
])
def test_bad_fields_are_named(fields, field):
    with pytest.raises(SFIConfigError, match=field):
        SFIConfig.from_json(json.dumps(fields))


def test_defaults_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert SFIConfig.from_env() == SFIConfig()
    monkeypatch.setenv(ENV_VAR, '{"topk": 64, "boundary_ids": [1, 2]}')
    assert SFIConfig.from_env() == SFIConfig(topk=64, boundary_ids=(1, 2))
    path = tmp_path / "sfi.json"
    path.write_text('{"recent": 32}')
    monkeypatch.setenv(ENV_VAR, str(path))
    assert SFIConfig.from_env().recent == 32
    monkeypatch.setenv(ENV_VAR, "{not json")
    with pytest.raises(SFIConfigError, match="not valid JSON"):
        SFIConfig.from_env()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(SFIConfigError, match="neither a JSON object nor a readable file"):
        SFIConfig.from_env()


def test_round_trip_and_bounds():
    cfg = SFIConfig(sinks=4, topk=100, recent=16, max_fast_steps=8, min_refresh_gap=2)
    assert SFIConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.max_kept == 4 + 100 + 16 + 8
    assert cfg.resolve_dense_backend("cuda") == "flashinfer" and cfg.resolve_dense_backend("cpu") == "torch_native"
