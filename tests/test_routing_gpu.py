"""The routing library's picks, counts, offsets and gather against torch, on the GPU.

The fused forward's tests compare top-k sets with the oracle's; these feed the routing kernels
logits directly: on quantized logits the ids must equal a stable descending sort's, order and
ties included (ties at the k-th score go to the lowest experts), elsewhere form a distinct,
ordered top-k; and every bookkeeping output is checked exactly, on both launch paths (one block
up to 16 tokens, three launches beyond).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def routing_lib():
    from autotune.runtime import load_routing
    from autotune.space import RoutingConfig

    return load_routing(RoutingConfig("bf16", "sm90"))


def torch_picks(logits, bias, top_k, n_group, topk_group, softmax):
    """ids [T, k] in (choice descending, expert ascending) order, every expert's choice value
    [T, E] (-inf where the group rule masks it) and every expert's score [T, E]."""
    score = logits.softmax(-1) if softmax else logits.sigmoid()
    choice = score + (bias if bias is not None else 0)
    t, e = choice.shape
    if n_group > 1:
        groups = choice.view(t, n_group, e // n_group)
        gscore = (groups.max(-1).values if softmax
                  else groups.topk(2, -1).values.sum(-1))
        kept = gscore.topk(topk_group, -1).indices
        mask = torch.ones(t, n_group, dtype=torch.bool, device=logits.device)
        mask.scatter_(1, kept, False)
        choice = choice.masked_fill(mask.repeat_interleave(e // n_group, 1), float("-inf"))
    ids = choice.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    return ids.int(), choice, score


CASES = {  # experts, top_k, n_group, topk_group, softmax, bias
    "super": (512, 22, 1, 1, False, True),
    "super-ties": (512, 22, 1, 1, False, False),
    "softmax-ties": (96, 6, 1, 1, True, False),
    "grouped": (256, 8, 8, 4, False, True),
    "wide-ties": (1024, 64, 1, 1, False, False),
}


@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 300, 2048])
@pytest.mark.parametrize("case", list(CASES))
def test_routing_matches_torch(case, tokens):
    experts, k, n_group, topk_group, softmax, with_bias = CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(tokens * 7 + experts)
    dev, width, up_rows, inter = "cuda", 64, 48, 48
    logits = torch.randn(tokens, experts, generator=gen, device=dev)
    if not with_bias:
        # A few dozen distinct logits per token: exact ties at the k-th score on most tokens,
        # and scores that differ only where the logits do, by far more than the kernel's fast
        # exp and torch's differ: the order must match exactly.
        logits = (logits * 4).round() / 4
    bias = (torch.randn(experts, generator=gen, device=dev) * 0.05) if with_bias else None
    src = torch.randn(tokens, width, generator=gen, device=dev)
    rows = tokens * k
    i32 = dict(dtype=torch.int32, device=dev)
    ids = torch.full((tokens, k), -7, **i32)
    weights = torch.full((tokens, k), float("nan"), device=dev)
    counts, slot = torch.full((experts,), -7, **i32), torch.full_like(ids, -7)
    start = torch.full((experts,), -7, **i32)
    mnk1, mnk2 = torch.full((experts, 3), -7, **i32), torch.full((experts, 3), -7, **i32)
    ptrs1 = torch.zeros(3, experts, dtype=torch.int64, device=dev)
    ptrs2 = torch.zeros_like(ptrs1)
    a1 = torch.full((rows, width), float("nan"), dtype=torch.bfloat16, device=dev)
    row_of = torch.full((rows,), -7, **i32)
    up = torch.empty(experts, up_rows, width, dtype=torch.bfloat16, device=dev)
    down = torch.empty(experts, width, inter, dtype=torch.bfloat16, device=dev)
    h1 = torch.empty(rows, up_rows, dtype=torch.bfloat16, device=dev)
    y2 = torch.empty(rows, width, dtype=torch.bfloat16, device=dev)
    scale = 2.5
    routing_lib()("route_gather", logits, experts, 0, -1, bias, tokens, experts, k, n_group,
                  topk_group, int(softmax), 1, scale, ids, weights, counts, slot, start, mnk1,
                  ptrs1, mnk2, ptrs2, a1, up, h1, h1, down, y2, width, up_rows, inter, src,
                  width, 1, row_of, tokens % 2)  # the first launch early or not: same results
    torch.cuda.synchronize()

    ref_ids, choice, score = torch_picks(logits, bias, k, n_group, topk_group, softmax)
    if with_bias:
        # Continuous scores: the kernel's fast exp may swap two experts whose choice values
        # differ by an ulp, so check that its picks are a top-k, distinct, in order.
        picked = choice.gather(1, ids.long())
        kth = choice.topk(k, -1).values[:, -1:]
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all(), "an expert picked twice"
        assert (picked >= kth - 1e-6).all() and (picked.diff(dim=-1) <= 1e-6).all()
        assert (ids != ref_ids).any(1).float().mean() < 0.01
    else:
        assert torch.equal(ids, ref_ids), f"ids differ on {(ids != ref_ids).any(1).sum()} tokens"
    w = score.gather(1, ids.long())
    torch.testing.assert_close(weights, w / w.sum(-1, keepdim=True) * scale, rtol=1e-5,
                               atol=1e-6)

    ref_counts = torch.bincount(ids.flatten().long(), minlength=experts).int()
    if tokens > 16:  # the one-block path keeps its counts in shared memory
        assert torch.equal(counts, ref_counts)
    assert torch.equal(start, (ref_counts.cumsum(0) - ref_counts).int())
    # Each pair's slot is its rank within its expert: rows form a permutation of 0..rows-1.
    pair_rows = start[ids.long()] + slot
    assert torch.equal(pair_rows.flatten().sort().values, torch.arange(rows, **i32))
    assert torch.equal(row_of, pair_rows.flatten())
    torch.testing.assert_close(a1[row_of.long()].float(),
                               src.repeat_interleave(k, 0).bfloat16().float(), rtol=0, atol=0)
    # Grouped GEMM arguments: active experts first (ascending), then the empty ones.
    order = torch.cat([torch.nonzero(ref_counts > 0).flatten(),
                       torch.nonzero(ref_counts == 0).flatten()])
    assert torch.equal(mnk1[:, 0], ref_counts[order])
    assert torch.equal(mnk1[:, 1:], torch.tensor([up_rows, width], **i32).expand(experts, 2))
    assert torch.equal(mnk2[:, 0], ref_counts[order])
    assert torch.equal(mnk2[:, 1:], torch.tensor([width, inter], **i32).expand(experts, 2))
    first = start[order].long()
    assert torch.equal(ptrs1[0], a1.data_ptr() + first * width * 2)
    assert torch.equal(ptrs1[1], up.data_ptr() + order * up_rows * width * 2)
    assert torch.equal(ptrs1[2], h1.data_ptr() + first * up_rows * 2)
    assert torch.equal(ptrs2[0], h1.data_ptr() + first * inter * 2)
    assert torch.equal(ptrs2[1], down.data_ptr() + order * width * inter * 2)
    assert torch.equal(ptrs2[2], y2.data_ptr() + first * width * 2)
