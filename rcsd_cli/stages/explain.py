"""``rcsd explain``: where on a completion the rubric-conditioned teacher would move the student.

For K stored samples, every completion token is shaded by the per-token loss ``train`` would apply
there (``losses.token_loss`` with the same ``--loss`` options as ``train``), with the teacher's preferred token and
both models' probabilities on hover, and the item's rubric and reference beside it. The result is one
self-contained HTML file (no scripts, fonts or network); ``--show`` also prints the shading in the
terminal.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from rcsd_cli.configs.explain import ExplainConfig
from rcsd_cli.data.artifacts import ensure_writable, read_artifact
from rcsd_cli.data.samples import read_samples
from rcsd_cli.errors import RcsdError
from rcsd_cli.modeling.logprobs import continuation_logits
from rcsd_cli.models import load_model
from rcsd_cli.rubrics.views import PromptView
from rcsd_cli.train.losses import token_loss
from rcsd_cli.ui import info, progress, results


def token_credit(s_logits: torch.Tensor, t_logits: torch.Tensor, ids: list[int], cfg: ExplainConfig) -> list[dict]:
    """Per completion token: the loss train would apply, both models' probabilities, the teacher's top token."""
    idx = torch.tensor(ids)
    loss = token_loss(s_logits, t_logits, idx, cfg.loss).loss
    p_s, p_t = s_logits.softmax(-1), t_logits.softmax(-1)
    top = p_t.max(-1)
    return [{"loss": loss[i].item(), "p_student": p_s[i, idx[i]].item(), "p_teacher": p_t[i, idx[i]].item(),
             "teacher_top": top.indices[i].item(), "teacher_top_p": top.values[i].item()} for i in range(len(ids))]


def _span(text: str, credit: dict, scale: float, top_text: str) -> str:
    alpha = min(1.0, credit["loss"] / scale) if scale > 0 else 0.0
    tip = (f"loss {credit['loss']:.4f} | p_student {credit['p_student']:.3f} | p_teacher {credit['p_teacher']:.3f}"
           f" | teacher prefers {top_text!r} ({credit['teacher_top_p']:.3f})")
    return (f'<span style="background: rgba(220, 40, 40, {alpha:.3f})" title="{html.escape(tip, quote=True)}">'
            f"{html.escape(text)}</span>")


def render_html(entries: list[dict], title: str) -> str:
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:80em}.item{display:flex;gap:2em;margin:2em 0;"
             "border-top:1px solid #ccc;padding-top:1em}.text{flex:3;white-space:pre-wrap;font-family:monospace;"
             "line-height:1.6}.side{flex:2;font-size:90%}td{vertical-align:top;padding:2px 6px}</style>",
             f"<h1>{html.escape(title)}</h1><p>Each token is shaded by the loss training would apply there "
             "(darker = the teacher disagrees more); hover for both models' probabilities and the teacher's "
             "preferred token.</p>"]
    for e in entries:
        rubric = "".join(f"<tr><td>{c.weight:+g}</td><td><b>{html.escape(c.title)}</b> "
                         f"{html.escape(c.description)}</td></tr>" for c in e["rubric"])
        parts.append(f"<div class='item'><div class='text'><h3>{html.escape(e['id'])}</h3>{e['spans']}</div>"
                     f"<div class='side'><p><b>Question</b><br>{html.escape(e['question'])}</p>"
                     f"<p><b>Reference</b><br>{html.escape(e['reference'] or '—')}</p>"
                     f"<p><b>Rubric</b></p><table>{rubric}</table>"
                     f"<p>mean loss/token {e['mean_loss']:.4f}</p></div></div>")
    return "\n".join(parts) + "\n"


def run_explain(cfg: ExplainConfig, output: Path, *, overwrite: bool = False, trust_remote_code: bool = False,
                show: bool = False) -> list[dict]:
    ensure_writable(output, overwrite)
    samples, meta = read_samples(cfg.samples)
    rubrics = {r.id: r for r in read_artifact(cfg.rubrics, "rubrics")[0]}
    samples = [s for s in samples if s.completion_token_ids][: cfg.limit]
    missing = [s.problem_id for s in samples if s.problem_id not in rubrics]
    if missing:
        raise RcsdError(f"{cfg.rubrics}: no rubric for problem {missing[0]!r} of {cfg.samples}")
    sample_cfg = meta.get("config") or {}
    view = PromptView.for_samples(cfg.prompt_style, cfg.teacher.thinking, sample_cfg, context=cfg.teacher.context)
    lm = load_model(cfg.model or meta.get("model"), trust_remote_code)
    tok = lm.tokenizer
    rows = [rubrics[s.problem_id] for s in samples]
    t_prompts = [view.teacher_ids(tok, r) for r in rows]
    conts = [s.completion_token_ids for s in samples]
    with progress("explain", len(samples)) as advance:
        s_logits = continuation_logits(lm.model, [s.prompt_token_ids for s in samples], conts, tok.pad_token_id)
        t_logits = continuation_logits(lm.model, t_prompts, conts, tok.pad_token_id)
        advance(len(samples))
    credits = [token_credit(a, b, c, cfg) for a, b, c in zip(s_logits, t_logits, conts, strict=True)]
    scale = max((c["loss"] for cs in credits for c in cs), default=0.0)
    entries = []
    for s, r, cs in zip(samples, rows, credits, strict=True):
        pieces = [str(tok.decode([t])) for t in s.completion_token_ids]
        spans = "".join(_span(p, c, scale, str(tok.decode([c["teacher_top"]])))
                        for p, c in zip(pieces, cs, strict=True))
        entries.append({"id": s.id, "question": r.question, "reference": r.reference_answer or r.answer,
                        "rubric": r.rubric, "spans": spans, "pieces": pieces, "credit": cs,
                        "mean_loss": sum(c["loss"] for c in cs) / len(cs)})
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(render_html(entries, f"Token credit: {cfg.samples} against {cfg.rubrics}"), encoding="utf-8")
    tmp.replace(output)
    if show:
        from rich.text import Text

        for e in entries:
            text = Text(f"{e['id']}: ")
            for piece, c in zip(e["pieces"], e["credit"], strict=True):
                level = int(min(1.0, c["loss"] / scale) * 4) if scale > 0 else 0
                text.append(piece, style=("", "on grey30", "on dark_red", "on red3", "on red1")[level])
            results.print(text)
    info(f"wrote token credit for {len(entries)} completions to {output}")
    return entries
