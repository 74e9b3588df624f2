"""Losses against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from rcsd_cli.configs.groups import LossConfig
from rcsd_cli.train.chunked_loss import TeacherSide, chunked_distill_loss
from rcsd_cli.train.losses import LOSSES, distill_token_loss, sampled_token_reverse_kl, token_loss


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def logits_of(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64))


P_T = [0.7, 0.2, 0.1]
P_S = [0.5, 0.3, 0.2]


def test_forward_kl_full_vocab_matches_hand_value():
    got = distill_token_loss(logits_of(P_S), logits_of(P_T), beta=0.0).item()
    assert got == pytest.approx(kl(P_T, P_S), abs=1e-9)  # 0.7ln1.4 + 0.2ln(2/3) + 0.1ln0.5 = 0.0851...
    assert got == pytest.approx(0.08512, abs=1e-4)


def test_reverse_kl_is_beta_one():
    got = distill_token_loss(logits_of(P_S), logits_of(P_T), beta=1.0).item()
    assert got == pytest.approx(kl(P_S, P_T), abs=1e-9)


def test_generalized_jsd_half():
    m = [(a + b) / 2 for a, b in zip(P_T, P_S, strict=True)]
    expected = 0.5 * kl(P_T, m) + 0.5 * kl(P_S, m)
    got = distill_token_loss(logits_of(P_S), logits_of(P_T), beta=0.5).item()
    assert got == pytest.approx(expected, abs=1e-9)


def test_top_k_renormalises_both_over_teacher_top_entries():
    t = [0.5, 0.3, 0.15, 0.05]
    s = [0.1, 0.2, 0.3, 0.4]
    # teacher's top-2 are entries 0 and 1: renormalised t = (5/8, 3/8), s = (1/3, 2/3)
    expected = kl([5 / 8, 3 / 8], [1 / 3, 2 / 3])
    got = distill_token_loss(logits_of(s), logits_of(t), top_k=2).item()
    assert got == pytest.approx(expected, abs=1e-9)


def test_temperature_divides_logits():
    t_logits = torch.tensor([2.0, 0.0], dtype=torch.float64)
    s_logits = torch.tensor([0.0, 0.0], dtype=torch.float64)
    pt = 1 / (1 + math.exp(-2.0 / 2.0))
    expected = kl([pt, 1 - pt], [0.5, 0.5])
    assert distill_token_loss(s_logits, t_logits, temperature=2.0).item() == pytest.approx(expected, abs=1e-9)


def test_clip_caps_each_entry_term():
    # terms: 0.7ln1.4=0.2355, 0.2ln(2/3)=-0.0811, 0.1ln0.5=-0.0693; clip 0.05 caps only the first
    expected = 0.05 + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    got = distill_token_loss(logits_of(P_S), logits_of(P_T), clip=0.05).item()
    assert got == pytest.approx(expected, abs=1e-9)


def test_identical_distributions_give_zero():
    x = torch.randn(3, 5, 11)
    assert distill_token_loss(x, x.clone(), top_k=4).abs().max().item() < 1e-6


def test_sampled_token_estimator_value_and_gradient():
    s = torch.tensor([math.log(0.25)], requires_grad=True)
    t = torch.tensor([math.log(0.5)])
    loss = sampled_token_reverse_kl(s, t)
    assert loss.item() == pytest.approx(-(math.log(0.5) - math.log(0.25)) * math.log(0.25))
    loss.backward()
    assert s.grad.item() == pytest.approx(-(math.log(0.5) - math.log(0.25)))  # advantage is held constant


LOSS_CONFIGS = {"topk_kl": LossConfig(kind="topk_kl", beta=0.3, top_k=5, temperature=1.2, clip=0.05),
                "jsd": LossConfig(kind="jsd", beta=0.3, temperature=1.2, clip=0.05),
                "sampled_rkl": LossConfig(kind="sampled_rkl", temperature=1.2)}


def test_every_loss_choice_is_registered():
    assert sorted(LOSSES) == sorted(LOSS_CONFIGS) == sorted(LossConfig.model_fields["kind"].annotation.__args__)


@pytest.mark.parametrize("kind", sorted(LOSS_CONFIGS))
def test_chunked_equals_unchunked_in_value_and_gradient(kind):
    torch.manual_seed(0)
    B, T, H, V = 2, 9, 8, 30
    head_s = torch.nn.Linear(H, V, bias=False)
    head_t = torch.nn.Linear(H, V, bias=False)
    h_t = torch.randn(B, T, H)
    mask = torch.ones(B, T)
    mask[1, 6:] = 0
    targets = torch.randint(0, V, (B, T))
    results = []
    for chunk in (T, 4, 1):
        h_s = torch.randn(B, T, H, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        head_s.zero_grad()
        sums = chunked_distill_loss(h_s, head_s, TeacherSide(h_t, head_t), mask, targets, LOSS_CONFIGS[kind],
                                    chunk_size=chunk)
        sums.weighted.backward()
        results.append((sums.weighted.item(), sums.kl.item(), h_s.grad.clone(), head_s.weight.grad.clone()))
    for other in results[1:]:
        assert other[0] == pytest.approx(results[0][0], rel=1e-5)
        assert other[1] == pytest.approx(results[0][1], rel=1e-5)
        assert torch.allclose(other[2], results[0][2], atol=1e-6)
        assert torch.allclose(other[3], results[0][3], atol=1e-6)
    assert results[0][2][1, 6:].abs().sum().item() == 0  # masked positions get no gradient


def test_row_weights_weigh_each_sequence():
    torch.manual_seed(0)
    B, T, H, V = 2, 5, 8, 30
    head_s, head_t = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    h_s, h_t = torch.randn(B, T, H), torch.randn(B, T, H)
    mask = torch.ones(B, T)
    mask[0, 2:] = 0
    targets = torch.randint(0, V, (B, T))
    with torch.no_grad():
        per_tok = distill_token_loss(head_s(h_s), head_t(h_t), top_k=5, temperature=1.2) * mask
        sums = chunked_distill_loss(h_s, head_s, TeacherSide(h_t, head_t), mask, targets,
                                    LossConfig(top_k=5, temperature=1.2, clip=None), chunk_size=2,
                                    row_weights=torch.tensor([1 / 2, 1 / 5]))
    plain, weighted = sums.loss, sums.weighted
    assert plain.item() == pytest.approx(per_tok.sum().item(), rel=1e-6)
    # weights 1/n_i: the sum of per-sequence means
    assert weighted.item() == pytest.approx(per_tok[0].sum().item() / 2 + per_tok[1].sum().item() / 5, rel=1e-6)


def test_top_k_with_tail_bucket_keeps_the_rest_as_one_entry():
    t = [0.5, 0.3, 0.15, 0.05]
    s = [0.1, 0.2, 0.3, 0.4]
    expected = kl([0.5, 0.3, 0.2], [0.1, 0.2, 0.7])  # top-2 entries plus tail mass, no renormalisation
    got = distill_token_loss(logits_of(s), logits_of(t), top_k=2, tail=True).item()
    assert got == pytest.approx(expected, abs=1e-9)


def test_group_advantages_hand_values():
    from rcsd_cli.train.losses import group_advantages

    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    adv = group_advantages(r, eps=0.0 + 1e-12)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert adv[0].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert adv[1].abs().max().item() == 0  # identical rewards carry no signal


def test_clipped_policy_loss_and_k3():
    from rcsd_cli.train.losses import clipped_policy_loss, k3_kl

    logp = torch.tensor([math.log(0.6), math.log(0.3)], dtype=torch.float64)
    old = torch.tensor([math.log(0.4), math.log(0.4)], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    # ratios 1.5 and 0.75: positive advantage clipped at 1.2; negative advantage takes max(0.75, 0.8) -> 0.8
    assert clipped_policy_loss(logp, old, adv, 0.2).tolist() == pytest.approx([-1.2, 0.8])
    assert k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])).item() == pytest.approx(
        0.5 - math.log(0.5) - 1)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_teacher_topk_logprobs_give_the_logits_loss(beta):
    """A teacher known by its top-k log-probs (stored offline, or from a server) gives the loss and the
    diagnostics its logits give: log-probs are logits less one constant per position."""
    from rcsd_cli.train.chunked_loss import TeacherTopK

    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(8, 50, bias=False).double(), torch.nn.Linear(8, 50, bias=False).double()
    h_s = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    targets = torch.randint(0, 50, (2, 5))
    cfg = LossConfig(top_k=5, beta=beta)
    top = torch.log_softmax(head_t(h_t), -1).topk(5, -1)
    by_logits = chunked_distill_loss(h_s, head_s, TeacherSide(h_t, head_t), mask, targets, cfg, chunk_size=2)
    by_topk = chunked_distill_loss(h_s, head_s, TeacherTopK(top.indices, top.values), mask, targets, cfg,
                                   chunk_size=2)
    # the loss reads fp32 logits (``fp32_logits``): equal to fp32 rounding
    assert by_topk.loss.item() == pytest.approx(by_logits.loss.item(), abs=1e-6)
    assert by_topk.kl.item() == pytest.approx(by_logits.kl.item(), abs=1e-6)
    assert by_topk.agree.item() == by_logits.agree.item()
    assert by_topk.health["clip_share"].item() == by_logits.health["clip_share"].item()
    assert "teacher_entropy" not in by_topk.health  # the whole vocabulary's entropy is not known from k entries
    (g_logits,) = torch.autograd.grad(by_logits.weighted, h_s)
    (g_topk,) = torch.autograd.grad(by_topk.weighted, h_s)
    assert torch.allclose(g_topk, g_logits, atol=1e-6)
    # a loss top-k below the k entries known restricts to the best of them, as the logits would
    fewer = cfg.model_copy(update={"top_k": 3})
    assert chunked_distill_loss(h_s, head_s, TeacherTopK(top.indices, top.values), mask, targets, fewer).loss.item() \
        == pytest.approx(chunked_distill_loss(h_s, head_s, TeacherSide(h_t, head_t), mask, targets, fewer).loss.item(),
                         abs=1e-6)


def test_chunked_token_logprobs_matches_full():
    from rcsd_cli.modeling.logprobs import chunked_token_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(4, 11, bias=False)
    h = torch.randn(2, 7, 4)
    y = torch.randint(0, 11, (2, 7))
    full = torch.log_softmax(head(h), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chunked_token_logprobs(h, head, y, chunk_size=3), full, atol=1e-6)


def test_registered_losses_by_hand():
    t = [0.7, 0.2, 0.1]
    s_ = [0.2, 0.5, 0.3]
    terms = [ti * math.log(ti / si) for ti, si in zip(t, s_, strict=True)]  # 0.877, -0.183, -0.110
    y = torch.tensor(1)  # the sampled token
    got = token_loss(logits_of(s_), logits_of(t), y, LossConfig(top_k=3, temperature=1.0, clip=0.05))
    assert got.loss.item() == pytest.approx(0.05 + terms[1] + terms[2], abs=1e-9)
    assert got.clip_share.item() == pytest.approx(1 / 3)
    assert got.forward_kl.item() == pytest.approx(sum(terms), abs=1e-9)  # unclipped, shared with the loss
    got = token_loss(logits_of(s_), logits_of(t), y, LossConfig(kind="jsd", beta=1.0, temperature=1.0, clip=None))
    assert got.loss.item() == pytest.approx(kl(s_, t), abs=1e-9) and got.forward_kl is None
    got = token_loss(logits_of(s_), logits_of(t), y, LossConfig(kind="sampled_rkl", temperature=1.0))
    # -(log p_T(y) - log p_S(y)) * log p_S(y) with y = entry 1
    assert got.loss.item() == pytest.approx(-(math.log(0.2) - math.log(0.5)) * math.log(0.5), abs=1e-9)
    assert got.clip_share.item() == 0.0
    same = token_loss(logits_of(t), logits_of(t), y, LossConfig(top_k=3, temperature=1.0, clip=0.05))
    assert same.loss.item() == pytest.approx(0.0, abs=1e-12) and same.clip_share.item() == 0.0


def test_entropy_and_distinct_n_by_hand():
    from rcsd_cli.train.losses import distinct_n, entropy

    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # uniform; p = (3/4, 1/4)
    expected = [math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert entropy(logits).tolist() == pytest.approx(expected)
    assert distinct_n([[1, 2, 1, 2], [3]], 2) == (2, 3)  # (1,2), (2,1), (1,2): two distinct of three
    assert distinct_n([[5]], 2) == (0, 0)


def test_chunked_health_sums_count_each_token_once_when_recomputed():
    """With T > chunk_size the chunks are recomputed in backward; the entropy sums must not double."""
    from rcsd_cli.train.losses import entropy

    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(8, 11, bias=False), torch.nn.Linear(8, 11, bias=False)
    h_s = torch.randn(2, 6, 8, requires_grad=True)
    h_t = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    targets = torch.randint(0, 11, (2, 6))
    sums = chunked_distill_loss(h_s, head_s, TeacherSide(h_t, head_t), mask, targets, LossConfig(), chunk_size=2)
    sums.weighted.backward()
    health = {name: value.item() for name, value in sums.health.items()}
    expected = (entropy(head_s(h_s).detach()) * mask).sum().item()
    assert health["student_entropy"] == pytest.approx(expected, rel=1e-5)
    assert health["teacher_entropy"] == pytest.approx((entropy(head_t(h_t)) * mask).sum().item(), rel=1e-5)
    assert 0.0 <= health["clip_share"] <= mask.sum().item()


def test_contrast_logits_by_hand_and_inside_the_chunked_loss():
    from rcsd_cli.modeling.logprobs import contrast_logits

    z_rubric, z_control = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    assert contrast_logits(z_rubric, z_control, 1.0).tolist() == [3.0, -1.0, 0.0]  # rubric's lead doubled
    assert contrast_logits(z_rubric, z_rubric, 0.7).tolist() == pytest.approx(z_rubric.tolist())  # no lead
    torch.manual_seed(1)
    head_s, head_t = torch.nn.Linear(8, 13, bias=False), torch.nn.Linear(8, 13, bias=False)
    h_s, h_t, h_c = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask, targets = torch.ones(2, 5), torch.randint(0, 13, (2, 5))
    cfg = LossConfig(top_k=4)
    got = chunked_distill_loss(h_s, head_s, TeacherSide(h_t, head_t, h_c, 0.5), mask, targets, cfg, chunk_size=2).loss
    expected = token_loss(head_s(h_s), contrast_logits(head_t(h_t), head_t(h_c), 0.5), targets, cfg).loss.sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)  # top-k taken after the contrast


@pytest.mark.parametrize("kind", ["topk_kl", "jsd", "sampled_rkl"])
def test_the_loss_reads_fp32_logits_under_bf16_autocast(kind):
    """Under bf16 autocast the loss and its gradient equal fp32's on the same hidden states: the logits the
    loss reads are computed in fp32. bf16 logits of magnitude ~10 are rounded by up to 0.03, which biases a
    0.02-nat KL by several percent (the size of the 0.05 clip's effect)."""
    torch.manual_seed(0)
    hidden, vocab = 64, 512
    s_head, t_head = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        s_head.weight.normal_(0, 1.0)
        t_head.weight.copy_(s_head.weight + 0.05 * torch.randn_like(s_head.weight))
    h_s = torch.randn(2, 40, hidden)
    h_t = h_s + 0.02 * torch.randn_like(h_s)
    mask, targets = torch.ones(2, 40), torch.randint(0, vocab, (2, 40))
    cfg = LossConfig(kind=kind) if kind == "sampled_rkl" else LossConfig(kind=kind, clip=None)
    out = {}
    for autocast in (False, True):
        s_head.zero_grad()
        h = h_s.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sums = chunked_distill_loss(h, s_head, TeacherSide(h_t, t_head), mask, targets, cfg, chunk_size=16)
        sums.weighted.backward()
        out[autocast] = (sums.loss.item(), torch.cat([h.grad.reshape(-1), s_head.weight.grad.reshape(-1)]))
    (l32, g32), (l16, g16) = out[False], out[True]
    assert l32 != 0 and l16 == pytest.approx(l32, rel=1e-4)
    assert F.cosine_similarity(g32, g16, dim=0) > 0.9999
