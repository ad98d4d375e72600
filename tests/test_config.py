"""Config: YAML + key=value, types, validation before any model loads, help lists every field."""
import subprocess
import sys
from dataclasses import fields

import pytest

from agro.config import (ConfigError, EvalConfig, GenerateConfig, TrainConfig, format_help,
                         load_config, parse_source)


def test_defaults_are_the_main_job():
    cfg = load_config(TrainConfig)
    assert cfg.model == "default" and cfg.task == "arithmetic" and cfg.loss == "agro"
    assert cfg.source == "fresh" and cfg.group_size >= 2


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("beta: 0.1\nsteps: 5\nloss: agro_on\nloss_options:\n  lr_coef: 0.5\n")
    cfg = load_config(TrainConfig, str(p), ["steps=7", "loss_options.lr_baseline=loo_var",
                                           "lora=true", "lr=3e-6"])
    assert cfg.beta == 0.1 and cfg.steps == 7 and cfg.lora is True and cfg.lr == 3e-6
    assert cfg.loss_options == {"lr_coef": 0.5, "lr_baseline": "loo_var"}


@pytest.mark.parametrize("override,needle", [
    ("beta=-0.1", "beta"),
    ("group_size=1", "group_size"),
    ("replay_prob=1.5", "replay_prob"),
    ("loss=ppo", "agro, agro_on"),
    ("source=live", "fresh, replay, offline, stale"),
    ("stepz=3", "Did you mean steps"),
    ("steps=three", "integer"),
    ("lora=maybe", "boolean"),
    ("precision=fp16", "bf16, fp32"),
    ("loss_options.lr_coef=0.5", "unknown option 'lr_coef' for loss agro"),
    ("temperature=0", "temperature"),
    ("source=offline", "offline_path"),
    ("beta=nan", "finite"),
    ("lora_dropout=0.1", "agro scores in eval mode"),
])
def test_invalid_values_are_refused_with_valid_options(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, [override])
    assert needle in str(e.value)
    assert "command line" in str(e.value)


def test_agro_on_needs_positive_beta():
    with pytest.raises(ConfigError, match="agro_on"):
        load_config(TrainConfig, None, ["loss=agro_on", "beta=0"])
    load_config(TrainConfig, None, ["loss=agro", "beta=0"])  # off-policy AGRO allows beta = 0


def test_loss_option_values_are_checked_by_the_registry_before_any_model_loads():
    with pytest.raises(ConfigError, match=r"loss_options.*loo_var.*group_size >= 3"):
        load_config(TrainConfig, None, ["loss=agro_on", "beta=0.1", "group_size=2",
                                        "loss_options.lr_baseline=loo_var"])
    with pytest.raises(ConfigError, match=r"reg_estimator='g9' is not one of"):
        load_config(TrainConfig, None, ["loss_options.reg_estimator=g9"])


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: 3\n\nbeta: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, str(p))
    assert f"{p}:3" in str(e.value) and "beta" in str(e.value)
    p.write_text("steps: 3\nwhat: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2.*unknown key 'what'"):
        load_config(TrainConfig, str(p))


def test_parse_source_mix():
    assert parse_source("fresh") == {"fresh": 1.0}
    assert parse_source("fresh:3,offline:1") == {"fresh": 0.75, "offline": 0.25}
    with pytest.raises(ConfigError):
        parse_source("fresh:-1")


def test_help_lists_every_field():
    for cls in (TrainConfig, GenerateConfig, EvalConfig):
        text = format_help(cls)
        for f in fields(cls):
            assert f"  {f.name} (" in text, f.name


def test_cli_refuses_bad_config_before_loading_a_model():
    # No model is loaded: an invalid value fails in well under the model-load time.
    r = subprocess.run([sys.executable, "-m", "agro.cli", "train", "beta=-1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "beta" in r.stderr and ">= 0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "agro.cli", "train", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "replay_prob" in r.stdout and "offline_path" in r.stdout
