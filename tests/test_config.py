"""Typed configs: unknown keys, wrong types and out-of-range values fail with the key path and the
expected value; CLI overrides reach any key; field docstrings are read."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from edgesmith.config import (ConfigError, apply_overrides, field_docs, from_dict, load_config, load_yaml, to_dict)
from edgesmith.errors import EdgesmithError


@dataclass
class Inner:
    temperature: float = 2.0
    """Softmax temperature."""
    mode: Literal["forward", "reverse"] = "forward"
    """KL direction."""

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError("temperature", f"expected > 0, got {self.temperature}")


@dataclass
class Outer:
    model: str = "default"
    """Model spec."""
    steps: int = 10
    """Optimizer steps."""
    quants: list[str] = field(default_factory=lambda: ["Q4_0"])
    """Quant types."""
    budget: Optional[float] = None
    """Seconds."""
    inner: Inner = field(default_factory=Inner)
    """Nested section."""


def test_defaults_and_nested():
    c = from_dict(Outer, {"steps": 3, "inner": {"temperature": 1.5}})
    assert c.steps == 3 and c.inner.temperature == 1.5 and c.inner.mode == "forward"
    assert to_dict(c)["inner"] == {"temperature": 1.5, "mode": "forward"}


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"inner\.temprature: unknown key \(did you mean 'temperature'\?\)"):
        from_dict(Outer, {"inner": {"temprature": 1}})


@pytest.mark.parametrize("data,msg", [
    ({"steps": "ten"}, r"steps: expected an integer, got 'ten'"),
    ({"steps": 1.5}, r"steps: expected an integer"),
    ({"inner": {"mode": "sideways"}}, r"inner\.mode: expected one of 'forward' \| 'reverse'"),
    ({"inner": {"temperature": -1}}, r"inner\.temperature: expected > 0"),
    ({"quants": [1, {}]}, r"quants\[1\]: expected a string"),
    ({"inner": 3}, r"inner: expected a mapping"),
    ({"budget": "soon"}, r"budget: expected float \| null"),
])
def test_errors_name_key_and_expectation(data, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict(Outer, data)


def test_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("steps: 5\ninner:\n  temperature: 3\n")
    c = load_config(Outer, p, ["inner.mode=reverse", "steps=7", "quants=[Q8_0, Q4_K_M]", "budget=1.5"])
    assert (c.steps, c.inner.mode, c.inner.temperature, c.quants, c.budget) == (7, "reverse", 3.0, ["Q8_0", "Q4_K_M"], 1.5)
    with pytest.raises(EdgesmithError, match=r"r\.yaml: inner\.nope: unknown key"):
        load_config(Outer, p, ["inner.nope=1"])
    with pytest.raises(ConfigError, match="override must look like"):
        apply_overrides({}, ["steps"])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(EdgesmithError, match=r"bad\.yaml: line \d+ invalid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(EdgesmithError, match="expected a mapping"):
        load_yaml(lst)
    with pytest.raises(EdgesmithError, match="recipe file not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_field_docs():
    assert field_docs(Outer)["steps"] == "Optimizer steps."
    assert field_docs(Inner)["mode"] == "KL direction."


def test_help_keeps_percent_signs():
    """A docstring with '%' (grad_checkpointing's '~30% slower') is shown as written, not %-formatted by argparse."""
    import argparse

    from edgesmith.config import add_config_args
    from edgesmith.trainconfig import TrainConfig

    p = argparse.ArgumentParser()
    add_config_args(p, TrainConfig)
    text = " ".join(p.format_help().split())
    assert "~30% slower" in text and "option_strings" not in text
