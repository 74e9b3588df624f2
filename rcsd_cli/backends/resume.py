"""Resumable generation: finished completions are appended to ``OUTPUT.partial.jsonl`` as they arrive.

A stage that generates wraps its backend calls in ``ResumableGenerator``. Each prompt has a stable
key (item id, sample index, attempt); a rerun with the same output and settings loads the finished
keys and only generates the rest, so an interrupted run — a killed process or a server that died —
keeps everything it had finished. The partial file is removed once the stage's output is written.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from rcsd_cli.data.artifacts import PartialLog
from rcsd_cli.modeling.generation import Generation, item_seed
from rcsd_cli.ui import info

OPERATIONAL = {"base_url", "concurrency", "max_retries", "backoff_s", "timeout_s", "api_key_env",
               "max_failures"}


class FinishedGeneration(BaseModel):
    key: str
    token_ids: list[int]
    text: str
    finish_reason: str


def fingerprint(cfg: BaseModel) -> dict:
    """The settings that change results; where and how fast requests go does not."""
    exclude = {"backend": OPERATIONAL} if "backend" in type(cfg).model_fields else None
    return cfg.model_dump(mode="json", exclude=exclude)


class ResumableGenerator:
    def __init__(self, engine, output: str | Path, cfg: BaseModel, fresh: bool = False):
        self.engine = engine
        self.log = PartialLog(output, FinishedGeneration, fingerprint(cfg), fresh=fresh)
        self.done = {row.key: row for row in self.log.load()}
        self.resumed = len(self.done)
        if self.resumed:
            info(f"resuming: {self.resumed} finished generations in {self.log.path}")

    def generate(self, keys: list[str], prompts: list[list[int]], gen_cfg, seed: int, on_done=None) -> list[Generation]:
        todo = [i for i, k in enumerate(keys) if k not in self.done]
        if on_done and len(todo) < len(keys):
            on_done(len(keys) - len(todo))

        def keep(indices, gens):
            rows = [FinishedGeneration(key=keys[todo[i]], token_ids=g.token_ids, text=g.text,
                                       finish_reason=g.finish_reason) for i, g in zip(indices, gens, strict=True)]
            self.log.append(rows)
            self.done.update({r.key: r for r in rows})
            if on_done:
                on_done(len(rows))

        failed = {}  # requests that failed for good (openai --max-failures): returned, never kept
        if todo:  # seeded by key: a resumed run draws what the uninterrupted one would have
            gens = self.engine.generate([prompts[i] for i in todo], gen_cfg, seed, on_done=keep,
                                        seeds=[item_seed(seed, keys[i]) for i in todo])
            failed = {keys[i]: g for i, g in zip(todo, gens, strict=True) if g.error}
        return [failed[k] if k in failed else
                Generation(self.done[k].token_ids, self.done[k].text, self.done[k].finish_reason) for k in keys]

    def finish(self) -> None:
        self.log.finish()
