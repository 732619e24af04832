"""The docs stay true to the code: every config key documented with its default, every event with its
fields; README commands; the module map."""

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


def _architecture_map() -> set[str]:
    """The files docs/architecture.md's module map names: ``orchestrator/x.py`` lines, and the
    file names indented under an ``orchestrator/dir/`` line."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("```\n", 2)[1]
    named, folder = set(), None
    for line in block.splitlines():
        first = line.split()[0] if line.strip() else ""
        if line.startswith("orchestrator/"):
            folder = first if first.endswith("/") else None
            if first.endswith(".py"):
                named.add(first)
        elif folder is not None and re.match(r" {4}\S", line) and first.endswith(".py"):
            named.add(folder + first)
    return named


def test_every_module_is_in_the_architecture_map() -> None:
    modules = {str(p.relative_to(REPO)) for p in (REPO / "orchestrator").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    named = _architecture_map()
    assert "orchestrator/controller/controller.py" in named, "the map's layout is read: the parser is stale"
    assert not modules - named, f"docs/architecture.md's module map lacks {sorted(modules - named)}"
    assert not named - modules, f"docs/architecture.md's module map names files that do not exist: {sorted(named - modules)}"


def test_every_event_record_is_written_somewhere() -> None:
    from orchestrator.events import EVENTS

    emitted = set()
    for path in (REPO / "orchestrator").rglob("*.py"):
        text = path.read_text()  # emit(Record(...)), or a record made for an emit elsewhere (ev.Record(...))
        emitted |= set(re.findall(r"\.emit\(\s*(?:ev\.)?(\w+)\(", text)) | set(re.findall(r"\bev\.(\w+)\(", text))
    assert emitted, "no emit() calls found: the pattern is stale"
    unused = sorted(cls.__name__ for cls in EVENTS.values() if cls.__name__ not in emitted)
    assert not unused, f"event records nothing writes: {unused}"


def test_docs_link_nothing_outside_the_repository() -> None:
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)", path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).resolve().is_relative_to(REPO), f"{path.name} links {target}"
        assert "../shared" not in path.read_text(), f"{path.name} cites a file outside the repository"


def _documented_fields(section: str) -> set[str]:
    """The field names in the first column of a docs/events.md section's table."""
    fields = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            fields |= set(re.findall(r"`(\w+)`", line.split("|")[1]))
    return fields


def test_every_event_record_has_the_fields_the_docs_list_both_ways() -> None:
    import dataclasses

    from orchestrator.events import EVENTS

    text = (REPO / "docs" / "events.md").read_text()
    sections = {m.group(1): m.group(2) for m in re.finditer(r"^## `(\w+)`\n(.*?)(?=^## |\Z)", text, re.S | re.M)}
    assert set(sections) == set(EVENTS), "one section per event record, and one record per section"
    for name, cls in EVENTS.items():
        fields = {f.name for f in dataclasses.fields(cls)} - {"ts", "extra"}
        documented = _documented_fields(sections[name])
        assert fields == documented, (f"{name}: docs/events.md lists {sorted(documented - fields)} that the record "
                                      f"lacks, and lacks {sorted(fields - documented)}")
