from __future__ import annotations

import pytest

from gpt_finetune.cfgfile import read_cfg
from gpt_finetune.errors import ConfigError
from gpt_finetune.settings import KEYS


def test_values_comments_equals_and_free_text(tmp_path):
    p = tmp_path / "a.cfg"
    p.write_text(
        "# comment\n"
        "\n"
        "model = gpt-3.5-turbo   # trailing comment\n"
        "sys_prompt = Answer #1 only; a=b stays\n"
        "user_input = what is 2 # 3?\n"
        "base_url = http://h/v1?x=1\n"
    )
    cfg = read_cfg(p, KEYS)
    assert cfg.values["model"].value == "gpt-3.5-turbo"
    assert cfg.values["sys_prompt"].value == "Answer #1 only; a=b stays"
    assert cfg.values["user_input"].value == "what is 2 # 3?"
    assert cfg.values["base_url"].value == "http://h/v1?x=1"
    assert cfg.values["model"].line == 3
    assert cfg.warnings == []


def test_unknown_key_warns_with_file_and_line(tmp_path):
    p = tmp_path / "a.cfg"
    p.write_text("model = m\nn_epoch = 3\n")
    cfg = read_cfg(p, KEYS)
    assert "n_epoch" not in cfg.values
    assert len(cfg.warnings) == 1 and f"{p}:2" in cfg.warnings[0] and "n_epoch" in cfg.warnings[0]


def test_placeholder_counts_as_unset(tmp_path):
    p = tmp_path / "a.cfg"
    p.write_text("openai_api_key = <openai_api_key>\n")
    cfg = read_cfg(p, KEYS)
    assert "openai_api_key" not in cfg.values
    assert "placeholder" in cfg.warnings[0]


def test_line_without_equals_is_an_error_naming_the_line(tmp_path):
    p = tmp_path / "a.cfg"
    p.write_text("model = m\njust words\n")
    with pytest.raises(ConfigError, match=rf"{p}:2"):
        read_cfg(p, KEYS)


def test_repeated_key_warns_and_last_wins(tmp_path):
    p = tmp_path / "a.cfg"
    p.write_text("model = a\nmodel = b\n")
    cfg = read_cfg(p, KEYS)
    assert cfg.values["model"].value == "b"
    assert "repeats line 1" in cfg.warnings[0]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_cfg(tmp_path / "nope.cfg", KEYS)
