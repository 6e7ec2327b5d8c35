"""LongerDecoder and similarity_features against plain loops; masking, empty histories, gradients and cost."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from trainer.models.sequence import (
    HistoryCrossAttention,
    LongerDecoder,
    Similarity,
    history_keys,
    similarity_features,
)

B, L, DIM, HIST, HEADS = 4, 9, 16, 12, 2


@pytest.fixture(autouse=True, scope="module")
def few_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def inputs(
    seed: int = 0, dtype: torch.dtype = torch.float64, length: int = L
) -> tuple[Tensor, Tensor, Tensor]:
    """Query tokens, history and a mask with a full row, a partial row, an empty row and a scattered row."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, DIM, generator=g, dtype=dtype)
    history = torch.randn(B, length, HIST, generator=g, dtype=dtype)
    mask = torch.zeros(B, length, dtype=torch.bool)
    mask[0] = True
    mask[1, :3] = True  # left-aligned, as trainer.models.model.padded makes them
    mask[3] = torch.rand(length, generator=g) < 0.5
    mask[3, 1] = True
    return query, history, mask


def decoder(seed: int = 0, layers: int = 2) -> LongerDecoder:
    torch.manual_seed(seed)
    return LongerDecoder(DIM, HEADS, layers, ffn_mult=2, history_dim=HIST).double()


def attention_reference(attn: HistoryCrossAttention, x: Tensor, keys: list[Tensor]) -> Tensor:
    """One query token x [dim] over a list of normalised history tokens, head by head, item by item."""
    if not keys:
        return torch.zeros_like(x)
    d = attn.history_dim
    contexts = []
    for h in range(attn.heads):
        q = attn.query.weight[h * d : (h + 1) * d] @ x + attn.query.bias[h * d : (h + 1) * d]
        scores = torch.stack([q @ k / math.sqrt(d) for k in keys])
        weights = torch.softmax(scores, dim=0)
        contexts.append(sum(w * k for w, k in zip(weights, keys)))
    return attn.out(torch.cat(contexts))


def decoder_reference(dec: LongerDecoder, query: Tensor, history: Tensor, mask: Tensor) -> Tensor:
    out = []
    for b in range(query.shape[0]):
        keys = [
            F.layer_norm(history[b, j], (history.shape[-1],)) for j in range(history.shape[1]) if mask[b, j]
        ]
        x = query[b]
        for layer in dec.layers:
            x = x + attention_reference(layer.attn, layer.attn_norm(x), keys)
            x = x + layer.ffn(layer.ffn_norm(x))
        out.append(dec.norm(x))
    return torch.stack(out)


def test_decoder_matches_loop() -> None:
    dec = decoder()
    query, history, mask = inputs()
    got = dec(query, history, mask)
    assert got.shape == (B, DIM)
    torch.testing.assert_close(got, decoder_reference(dec, query, history, mask), atol=1e-10, rtol=1e-10)


def test_content_joined_in_the_decoder_is_the_joined_history() -> None:
    """The ID part and the content part given apart (the content in another dtype) read as their concatenation."""
    dec = decoder()
    query, history, mask = inputs()
    split = HIST // 3
    ids, content = history[..., :split], history[..., split:].float()
    joined = torch.cat([ids, content.double()], dim=-1)
    torch.testing.assert_close(dec(query, ids, mask, content), dec(query, joined, mask), atol=0, rtol=0)


def test_similarity_module_is_the_function() -> None:
    query, history, mask = inputs()
    target = torch.randn(B, HIST, dtype=torch.float64)
    got = Similarity(3)(target, history, mask)
    torch.testing.assert_close(got, similarity_features(target, history, mask, 3), atol=0, rtol=0)
    assert not list(Similarity(3).state_dict())  # nothing new in checkpoints


def test_several_query_tokens() -> None:
    dec = decoder()
    query, history, mask = inputs()
    tokens = torch.stack([query, query.flip(0)], dim=1)  # [B, 2, dim]
    got = dec(tokens, history, mask)
    assert got.shape == (B, 2, DIM)
    torch.testing.assert_close(got[:, 0], dec(query, history, mask))
    # token 1 of row b is row B-1-b's query, read against row b's history
    torch.testing.assert_close(got[:, 1], decoder_reference(dec, query.flip(0), history, mask))


def test_attention_is_multihead_attention_folded() -> None:
    """Load a standard nn.MultiheadAttention (key/value dim HIST) into HistoryCrossAttention: same outputs."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(DIM, HEADS, kdim=HIST, vdim=HIST, batch_first=True).double()
    for p in mha.parameters():  # make the biases non-zero
        nn.init.normal_(p, std=0.3)
    attn = HistoryCrossAttention(DIM, HIST, HEADS).double()
    d = DIM // HEADS
    bq, _, bv = mha.in_proj_bias.split(DIM)
    with torch.no_grad():
        for h in range(HEADS):
            rows, cols = slice(h * d, (h + 1) * d), slice(h * HIST, (h + 1) * HIST)
            wk = mha.k_proj_weight[rows]  # [d, HIST]
            attn.query.weight[cols] = math.sqrt(HIST / d) * wk.T @ mha.q_proj_weight[rows]
            attn.query.bias[cols] = math.sqrt(HIST / d) * wk.T @ bq[rows]
            attn.out.weight[:, cols] = mha.out_proj.weight[:, rows] @ mha.v_proj_weight[rows]
        attn.out.bias.copy_(mha.out_proj.weight @ bv + mha.out_proj.bias)
    query, history, mask = inputs()
    mask[2, :5] = True  # MHA returns NaN for an empty row; compare on rows that have history
    keys, attend, nonempty = history_keys(history, mask)
    x = torch.randn(B, 3, DIM, dtype=torch.float64)
    want, _ = mha(x, keys, keys, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(attn(x, keys, attend, nonempty), want)


def test_masked_history_entries_do_not_matter() -> None:
    dec = decoder()
    query, history, mask = inputs()
    noisy = history.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), HIST, dtype=history.dtype) * 100
    torch.testing.assert_close(dec(query, noisy, mask), dec(query, history, mask), atol=0, rtol=0)
    noisy[~mask] = float("nan")
    assert torch.isfinite(dec(query, noisy, mask)).all()


def test_empty_history_is_finite_and_a_zero_update() -> None:
    dec = decoder()
    query, history, _ = inputs()
    empty = torch.zeros(B, L, dtype=torch.bool)
    got = dec(query, history, empty)
    assert torch.isfinite(got).all()
    x = query
    for layer in dec.layers:  # what is left with no attention: the FFN path alone
        x = x + layer.ffn(layer.ffn_norm(x))
    torch.testing.assert_close(got, dec.norm(x))
    # L = 0 works too
    assert torch.isfinite(dec(query, history[:, :0], empty[:, :0])).all()


def test_gradients_reach_query_history_and_weights() -> None:
    dec = decoder()
    query, history, mask = inputs()
    query.requires_grad_(True)
    history.requires_grad_(True)
    dec(query, history, mask).pow(2).sum().backward()
    assert torch.isfinite(query.grad).all() and (query.grad.abs().sum(1) > 0).all()
    assert torch.isfinite(history.grad).all()
    assert history.grad[mask].abs().sum(-1).gt(0).all()
    assert (history.grad[~mask] == 0).all()
    for name, p in dec.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_cost_is_linear_in_history_length() -> None:
    long = 1000
    dec = LongerDecoder(DIM, HEADS, 2, history_dim=HIST)
    query = torch.randn(2, DIM, requires_grad=True)
    history = torch.randn(2, long, HIST, requires_grad=True)
    mask = torch.rand(2, long) < 0.9
    with LargestOutput() as largest:
        dec(query, history, mask).sum().backward()
    assert largest.numel <= 2 * long * HIST  # nothing of size L x L (10^6), only history-sized tensors
    # the projections never see the L tokens: their FLOPs do not depend on L
    flops = []
    for length in (10, long):
        with FlopCounterMode(display=False) as counter:
            dec(query, history[:, :length], mask[:, :length])
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1]
    start = time.perf_counter()
    for _ in range(5):
        dec(query, history, mask).sum().backward()
    assert (time.perf_counter() - start) / 5 < 0.5


def test_float32_and_bf16_on_cpu() -> None:
    dec = decoder().float()
    query, history, mask = inputs(dtype=torch.float32)
    want = decoder_reference(decoder(), query.double(), history.double(), mask)
    got = dec(query, history, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    low = dec.to(torch.bfloat16)(query.bfloat16(), history.bfloat16(), mask)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.double(), want, atol=0.1, rtol=0.1)
    # float32 history under bf16 weights (bank vectors kept in float32): cast inside, no dtype error
    assert torch.isfinite(dec(query.bfloat16(), history, mask)).all()


def similarity_reference(target: Tensor, history: Tensor, mask: Tensor, top_k: int) -> Tensor:
    rows = []
    for b in range(target.shape[0]):
        positions = [j for j in range(history.shape[1]) if mask[b, j]]
        sims = {j: float(F.cosine_similarity(target[b], history[b, j], dim=0)) for j in positions}
        recent = [sims[j] for j in reversed(positions)][:top_k]
        ranked = sorted(sims.values(), reverse=True)[:top_k]
        rows.append([*recent, *[0.0] * (top_k - len(recent)), *ranked, *[0.0] * (top_k - len(ranked))])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("top_k", [1, 4, L, L + 3])
def test_similarity_matches_loop(top_k: int) -> None:
    g = torch.Generator().manual_seed(top_k)
    target = torch.randn(B, HIST, generator=g, dtype=torch.float64)
    _, history, mask = inputs(seed=top_k)
    got = similarity_features(target, history, mask, top_k)
    assert got.shape == (B, 2 * top_k)
    torch.testing.assert_close(got, similarity_reference(target, history, mask, top_k))
    assert (got[2] == 0).all()  # the empty row


def test_similarity_masking_gradients_and_dtype() -> None:
    target = torch.randn(B, HIST, requires_grad=True)
    _, history, mask = inputs(dtype=torch.float32)
    history.requires_grad_(True)
    got = similarity_features(target, history, mask, 4)
    noisy = history.detach().clone()
    noisy[~mask] = float("nan")
    torch.testing.assert_close(similarity_features(target, noisy, mask, 4), got)
    got.sum().backward()
    assert torch.isfinite(target.grad).all() and target.grad.abs().sum() > 0
    assert torch.isfinite(history.grad).all() and (history.grad[~mask] == 0).all()
    low = similarity_features(target.bfloat16(), history.bfloat16(), mask, 4)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), got.detach(), atol=0.02, rtol=0.02)
