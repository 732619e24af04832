"""The docs stay true to the code: every config key documented with its default; README commands."""

from __future__ import annotations

import re

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from orchestrator.config import Config, validate_config
from tests.helpers import REPO


def _default_text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value == {}:
        return "{}"
    return str(value)


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _leaf_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append((f"{prefix}{name}", field))
    return keys


def test_every_config_key_is_documented_with_its_default() -> None:
    doc = (REPO / "docs" / "config.md").read_text()
    keys = _leaf_keys(Config)
    assert any(key == "cluster.network.interface" for key, _ in keys), "nested sections are walked"
    for key, field in keys:
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} missing from docs/config.md"
        default = _default_text(field.get_default(call_default_factory=True))
        assert f"`{default}`" in row, f"{key}: docs/config.md does not show the default {default}"


def test_yaml_examples_in_docs_are_valid() -> None:
    for path in (REPO / "docs").glob("*.md"):
        for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S):
            validate_config(yaml.safe_load(block))


def test_readme_starts_with_the_two_commands() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("bash .ci/setup && .venv/bin/orchestrator launch cluster_configs/local.yaml")
    assert block[1].startswith("bash .ci/run")
