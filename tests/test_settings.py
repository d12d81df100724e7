"""Precedence, highest first: flags, -c file, environment, default config file, defaults.
One small test for each adjacent pair."""

from __future__ import annotations

import pytest

from gpt_finetune.errors import ConfigError
from gpt_finetune.settings import load_settings, redact


@pytest.fixture
def files(tmp_path):
    explicit = tmp_path / "explicit.cfg"
    default = tmp_path / "default.cfg"
    return explicit, default


def test_flag_beats_config_file(files):
    explicit, default = files
    explicit.write_text("model = from-file\n")
    s = load_settings({"model": "from-flag"}, config_file=explicit, env={}, default_config=default)
    assert s.model == "from-flag" and s.origin("model") == "command line"


def test_config_file_beats_environment(files):
    explicit, default = files
    explicit.write_text("openai_api_key = sk-file-0000\n")
    s = load_settings({}, config_file=explicit, env={"OPENAI_API_KEY": "sk-env-1111"}, default_config=default)
    assert s.openai_api_key == "sk-file-0000"
    assert s.origin("openai_api_key") == f"{explicit}:1"


def test_environment_beats_default_config(files):
    _, default = files
    default.write_text("model = from-default-file\n")
    s = load_settings({}, env={"GPT_FINETUNE_MODEL": "from-env"}, default_config=default)
    assert s.model == "from-env"


def test_default_config_beats_defaults(files):
    _, default = files
    default.write_text("task_type = classification\n")
    s = load_settings({}, env={}, default_config=default)
    assert s.task_type == "classification"
    assert load_settings({}, env={}, default_config=files[0]).task_type == "answering"


def test_placeholder_in_file_falls_through_to_environment(files):
    explicit, default = files
    explicit.write_text("openai_api_key = <openai_api_key>\n")
    warnings = []
    s = load_settings(
        {}, config_file=explicit, env={"OPENAI_API_KEY": "sk-env-1111"}, default_config=default, warn=warnings.append
    )
    assert s.openai_api_key == "sk-env-1111"
    assert any("placeholder" in w for w in warnings)


def test_bad_value_names_key_file_and_line(files):
    explicit, default = files
    explicit.write_text("model = m\nn_epochs = three\n")
    with pytest.raises(ConfigError) as exc:
        load_settings({}, config_file=explicit, env={}, default_config=default)
    assert f"{explicit}:2" in str(exc.value) and "n_epochs" in str(exc.value)


def test_bad_environment_value_names_variable(files):
    with pytest.raises(ConfigError, match="GPT_FINETUNE_TEMPERATURE"):
        load_settings({}, env={"GPT_FINETUNE_TEMPERATURE": "hot"}, default_config=files[1])


def test_hyperparameter_ranges_and_auto(files):
    explicit, default = files
    explicit.write_text("n_epochs = auto\nbatch_size = 256\nlearning_rate_multiplier = 0.5\n")
    s = load_settings({}, config_file=explicit, env={}, default_config=default)
    assert (s.n_epochs, s.batch_size, s.learning_rate_multiplier) == ("auto", 256, 0.5)
    explicit.write_text("n_epochs = 51\n")
    with pytest.raises(ConfigError, match="from 1 to 50"):
        load_settings({}, config_file=explicit, env={}, default_config=default)


def test_redact_never_shows_whole_key():
    key = "sk-proj-abcdefghijklmnopqrstuvwxyz123456"
    shown = redact(key)
    assert key not in shown and shown.endswith("3456") and len(shown) < 15
    assert redact("short") == "***"


def test_the_engine_s_dtype_is_a_setting_with_its_choices(files):
    explicit, default = files
    explicit.write_text("inference_dtype = bfloat16\n")
    assert load_settings({}, config_file=explicit, env={}, default_config=default).inference_dtype == "bfloat16"
    s = load_settings({}, env={"GPT_FINETUNE_INFERENCE_DTYPE": "float32"}, default_config=default)
    assert s.inference_dtype == "float32"
    explicit.write_text("model = m\ninference_dtype = fp8\n")
    with pytest.raises(ConfigError) as exc:
        load_settings({}, config_file=explicit, env={}, default_config=default)
    assert f"{explicit}:2" in str(exc.value) and "bfloat16" in str(exc.value)
