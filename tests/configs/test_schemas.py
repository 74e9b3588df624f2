"""The JSON Schemas in schemas/ are generated from the Pydantic models and must not drift."""

import json

import pytest
from pydantic import ValidationError

from rcsd_cli.configs.schemas import export_json_schemas
from rcsd_cli.data.rows import Check, Criterion
from tests.conftest import ROOT

SCHEMAS = ROOT / "schemas"


def test_schema_files_match_models():
    expected = export_json_schemas()
    on_disk = {p.name for p in SCHEMAS.glob("*.json")}
    assert on_disk == set(expected), "run: python -m rcsd_cli.configs.schemas schemas"
    for name, schema in expected.items():
        stale = f"{name} is stale: python -m rcsd_cli.configs.schemas"
        assert json.loads((SCHEMAS / name).read_text()) == schema, stale


def test_criterion_validation():
    assert Criterion(id="a", title="t", weight="7").weight == 7.0
    with pytest.raises(ValidationError):
        Criterion(id="a", title="t", weight="ten")
    with pytest.raises(ValidationError):
        Criterion(id="a", title="t", weight=float("nan"))
    with pytest.raises(ValidationError):
        Check(kind="regex", value="(unclosed")
    with pytest.raises(ValidationError):
        Check(kind="max_words", value="many")


def test_schemas_and_the_verl_reward_import_nothing_from_the_cli_layer():
    """verl workers import the reward function: Typer and Rich stay out of that process."""
    import subprocess
    import sys

    code = ("import sys, rcsd_cli.configs.schemas, rcsd_cli.verl_reward, rcsd_cli.data.artifacts; "
            "print(sorted(m for m in ('typer', 'rich', 'click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
