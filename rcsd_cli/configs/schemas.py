"""Every stage config by name, and the JSON Schema export of rows and configs (``schemas/``):
``python -m rcsd_cli.configs.schemas schemas``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from rcsd_cli.configs.diagnose import DiagnoseConfig
from rcsd_cli.configs.eval import EvalConfig
from rcsd_cli.configs.eval_rubrics import EvalRubricsConfig
from rcsd_cli.configs.explain import ExplainConfig
from rcsd_cli.configs.gen_rubrics import GenRubricsConfig
from rcsd_cli.configs.sample import SampleConfig
from rcsd_cli.configs.score import ScoreConfig
from rcsd_cli.configs.serve import ServeConfig
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.rows import EXTRA_MODELS, ROW_MODELS

CONFIG_MODELS: dict[str, type[BaseModel]] = {
    "gen-rubrics": GenRubricsConfig,
    "sample": SampleConfig,
    "score": ScoreConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "diagnose": DiagnoseConfig,
    "explain": ExplainConfig,
    "eval-rubrics": EvalRubricsConfig,
    "serve": ServeConfig,
}


def export_json_schemas() -> dict[str, dict]:
    """JSON Schema of every row and config model, keyed by the file name in ``schemas/``."""
    out = {}
    for name, model in {**ROW_MODELS, **EXTRA_MODELS}.items():
        out[f"{name}.schema.json"] = model.model_json_schema()
    for name, model in CONFIG_MODELS.items():
        out[f"{name}-config.schema.json"] = model.model_json_schema()
    return out


def write_json_schemas(folder) -> list:
    """Regenerate ``schemas/``: ``python -m rcsd_cli.configs.schemas``."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, schema in export_json_schemas().items():
        (folder / fname).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(folder / fname)
    return written



if __name__ == "__main__":  # pragma: no cover
    import sys

    for p in write_json_schemas(sys.argv[1] if len(sys.argv) > 1 else "schemas"):
        print(p)
