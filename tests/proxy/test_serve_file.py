"""``thinkcap serve`` settings read from the config file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from thinkcap.controller.queue import MG1, BatchingEngine
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.toml_reader import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "thinkcap.toml"


def _config(tmp_path: Path, backend: str, proxy: str = "") -> Path:
    text = EXAMPLE.read_text()
    text = text[: text.index("[backend]")] + text[text.index("[objective]") :]
    if "slots" in backend:  # a batching engine: per type the prefill, the per-token time from the step
        text = re.sub(r"overhead_s = ([0-9.]+), per_token_s = [0-9.]+", r"prefill_s = \1", text)
    path = tmp_path / "c.toml"
    path.write_text(f'[backend]\nurl = "http://127.0.0.1:9"\n{backend}\n[proxy]\n{proxy}\n' + text)
    return path


def test_one_slot_is_mg1_and_admits_one_request_at_a_time(tmp_path: Path) -> None:
    """Without slots the backend is one M/G/1 server, and one request at a time goes upstream."""
    s = load_settings(_config(tmp_path, ""))
    assert s.backend.slots == 1 and s.proxy.max_concurrency == 1 and s.model.queue == MG1()


def test_slots_set_the_queue_model_and_the_default_concurrency(tmp_path: Path) -> None:
    """With slots = 8 the proxy lets 8 requests run upstream unless max_concurrency says otherwise."""
    text = "slots = 8\nstep = { base_s = 0.015, per_seq_s = 0.004 }"
    s = load_settings(_config(tmp_path, text))
    assert s.backend.slots == 8 and s.proxy.max_concurrency == 8
    assert s.model.queue == BatchingEngine(8, 0.015, 0.004)
    assert s.model.types[0].task.per_token_s == 0.015 + 0.004  # the step at one sequence
    s = load_settings(_config(tmp_path, text, "max_concurrency = 3"))
    assert s.proxy.max_concurrency == 3


def test_the_step_measured_per_occupancy_is_read_and_bad_levels_are_config_errors(tmp_path: Path) -> None:
    """``levels_s`` gives the step at 1, 2, ... sequences (the line only extends it): the queue
    model and each type's per-token time read it; a level that is not a positive number is a
    config error naming the key."""
    text = "slots = 4\nstep = { base_s = 0.001, per_seq_s = 0.007, levels_s = [0.0065, 0.0173, 0.0252, 0.0279] }"
    s = load_settings(_config(tmp_path, text))
    assert s.model.queue == BatchingEngine(4, 0.001, 0.007, (), (0.0065, 0.0173, 0.0252, 0.0279))
    assert s.model.types[0].task.per_token_s == 0.0065
    for bad in ("[0.01, 0]", "[0.01, -1]", '["x"]', "0.01"):
        with pytest.raises(ConfigError, match=r"backend\.step\.levels_s"):
            step = f"step = {{ base_s = 0.001, per_seq_s = 0.007, levels_s = {bad} }}"
            load_settings(_config(tmp_path, f"slots = 4\n{step}"))


def test_llama_server_dialect_keys(tmp_path: Path) -> None:
    """dialect = "llama-server": the model thinks unless told, and upstream connections are not
    kept alive unless told; ``thinks`` belongs to that dialect alone."""
    s = load_settings(_config(tmp_path, 'dialect = "llama-server"'))
    assert s.backend.thinks and s.backend.reasoning_cap and not s.backend.keep_alive
    s = load_settings(_config(tmp_path, 'dialect = "llama-server"\nthinks = false\nkeep_alive = true'))
    assert not s.backend.thinks and not s.backend.reasoning_cap and s.backend.keep_alive
    assert load_settings(_config(tmp_path, 'dialect = "vllm"')).backend.keep_alive
    with pytest.raises(ConfigError, match=r"backend\.thinks: is read with dialect"):
        load_settings(_config(tmp_path, 'dialect = "vllm"\nthinks = false'))
    with pytest.raises(ConfigError, match=r"backend\.keep_alive: must be true or false"):
        load_settings(_config(tmp_path, 'keep_alive = "no"'))


def test_budget_keys(tmp_path: Path) -> None:
    """``budget`` defaults to auto and takes native, forced or auto; ``reasoning_tags`` defaults
    to ``<think>`` and ``</think>`` and must be two non-empty strings."""
    s = load_settings(_config(tmp_path, ""))
    assert s.backend.budget == "auto" and s.backend.reasoning_tags == ("<think>", "</think>")
    s = load_settings(_config(tmp_path, 'budget = "forced"\nreasoning_tags = ["<reason>", "</reason>"]'))
    assert s.backend.budget == "forced" and s.backend.reasoning_tags == ("<reason>", "</reason>")
    with pytest.raises(ConfigError, match=r"backend\.budget: must be one of \['native', 'forced', 'auto'\]"):
        load_settings(_config(tmp_path, 'budget = "always"'))
    for bad in ('["<think>"]', '["<think>", ""]', '["a", "b", "c"]', '"<think>"'):
        with pytest.raises(ConfigError, match=r"backend\.reasoning_tags: must be"):
            load_settings(_config(tmp_path, f"reasoning_tags = {bad}"))


def test_engine_gauges_are_off_unless_given_an_interval(tmp_path: Path) -> None:
    """``engine_gauges_s``: off by default (and with false or 0), else a positive interval."""
    assert load_settings(_config(tmp_path, "")).backend.engine_gauges_s is None
    assert load_settings(_config(tmp_path, "engine_gauges_s = 0.5")).backend.engine_gauges_s == 0.5
    assert load_settings(_config(tmp_path, "engine_gauges_s = false")).backend.engine_gauges_s is None
    with pytest.raises(ConfigError, match=r"backend\.engine_gauges_s"):
        load_settings(_config(tmp_path, "engine_gauges_s = -1"))
