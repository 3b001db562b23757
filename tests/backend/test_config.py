"""SFIConfig: defaults, validation (errors name the field), JSON and SFI_CONFIG parsing."""

import json

import pytest

from sfi_sglang.config import ENV_VAR, SFIConfig, SFIConfigError


def test_defaults_are_valid():
    cfg = SFIConfig()
    assert cfg == SFIConfig.from_dict({})
    assert cfg == SFIConfig.from_dict(cfg.to_dict())
    assert cfg.max_kept == cfg.sinks + cfg.topk + cfg.recent + cfg.max_fast_steps
    assert cfg.resolve_dense_backend("cuda") == "flashinfer"
    assert cfg.resolve_dense_backend("cpu") == "torch_native"


@pytest.mark.parametrize(
    "field, value",
    [
        ("topk", 0),
        ("sinks", -1),
        ("recent", -1),
        ("max_fast_steps", 0),
        ("min_refresh_gap", SFIConfig().max_fast_steps + 1),
        ("prefill_queries", 17),
        ("neighbor_window", -1),
        ("alpha", 0),
        ("alpha", 1.5),
        ("dense_backend", "fa9"),
        ("boundary_ids", [3, -1]),
        ("extra_boundary_ids", [-5]),
        ("topk", "2048"),  # a string where an int is expected
        ("sinks", True),  # bool is not accepted as int
        ("max_fast_steps", 8.0),
        ("boundary", 1),  # int is not accepted as bool
        ("boundary_ids", [1, True]),
    ],
)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(SFIConfigError, match=f"'{field}'"):
        SFIConfig.from_dict({field: value})


def test_min_refresh_gap_equal_to_max_fast_steps_is_ok():
    cfg = SFIConfig(max_fast_steps=10, min_refresh_gap=10)
    assert cfg.min_refresh_gap == cfg.max_fast_steps


@pytest.mark.parametrize("field", ["topkk", "refresh_lag", "adaptive_refresh", "coverage_target", "prior_lambda_max"])
def test_unknown_field_is_named(field):
    """A misspelt field, or one that no longer exists, fails loudly instead of being ignored."""
    with pytest.raises(SFIConfigError, match=f"unknown SFI config field.*{field}"):
        SFIConfig.from_dict({field: 3})


def test_non_object_json_is_rejected():
    with pytest.raises(SFIConfigError, match="JSON object"):
        SFIConfig.from_json("[1, 2]")


@pytest.mark.parametrize("text", ["{", "{'topk': 3}", "{\"topk\": }", "nope"])
def test_invalid_json(text):
    with pytest.raises(SFIConfigError, match="not valid JSON"):
        SFIConfig.from_json(text)


def test_lists_become_tuples():
    cfg = SFIConfig.from_json('{"boundary_ids": [13, 198], "extra_boundary_ids": [7]}')
    assert cfg.boundary_ids == (13, 198)
    assert cfg.extra_boundary_ids == (7,)


def test_env_unset_gives_defaults(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert SFIConfig.from_env() == SFIConfig()
    monkeypatch.setenv(ENV_VAR, "   ")
    assert SFIConfig.from_env() == SFIConfig()


def test_env_inline_json(monkeypatch):
    monkeypatch.setenv(ENV_VAR, ' {"topk": 64, "alpha": 1.0} ')
    cfg = SFIConfig.from_env()
    assert (cfg.topk, cfg.alpha) == (64, 1.0)
    assert cfg.recent == SFIConfig().recent


def test_env_path_to_json_file(monkeypatch, tmp_path):
    path = tmp_path / "sfi.json"
    path.write_text(json.dumps({"sinks": 1, "recent": 8, "dense_backend": "triton"}))
    monkeypatch.setenv(ENV_VAR, str(path))
    cfg = SFIConfig.from_env()
    assert (cfg.sinks, cfg.recent, cfg.dense_backend) == (1, 8, "triton")


def test_env_bad_values(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(SFIConfigError, match="neither a JSON object nor a readable file"):
        SFIConfig.from_env()
    bad = tmp_path / "bad.json"
    bad.write_text('{"topk": 0}')
    monkeypatch.setenv(ENV_VAR, str(bad))
    with pytest.raises(SFIConfigError, match="'topk'"):
        SFIConfig.from_env()
    monkeypatch.setenv(ENV_VAR, '{"topk": 1,}')
    with pytest.raises(SFIConfigError, match="not valid JSON"):
        SFIConfig.from_env()
