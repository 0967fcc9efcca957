"""vlpt.models.layers.attention: on CPU in bf16 it spells attention out (two matmuls, an fp32 softmax)
instead of calling PyTorch's fused kernel; it must give F.scaled_dot_product_attention's result, masks,
causality (top-left aligned when queries and keys differ in number) and rows that may attend nowhere
included, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from vlpt.models import layers
from vlpt.models.layers import attention


def _inputs(q_len: int, k_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 2, n, 16, generator=g) * 2).bfloat16().requires_grad_() for n in (q_len, k_len, k_len)]


def _result(fn, q, k, v, **kw):
    """Output and input gradients for a fixed upstream gradient."""
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out) / out.numel() ** 0.5)
    return [t.float() for t in (out, *grads)]


def _reference(q, k, v, mask=None, causal=False):
    """SDPA in fp32 on the same bf16 inputs."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)


@pytest.mark.parametrize("q_len, k_len, causal, masked", [
    (9, 9, False, False), (9, 9, True, False), (4, 9, True, False), (6, 6, False, True), (5, 7, False, True)])
def test_unfused_cpu_attention_equals_sdpa(q_len, k_len, causal, masked, monkeypatch):
    q, k, v = _inputs(q_len, k_len)
    mask = None
    if masked:  # random keys per query, one query that may attend nowhere
        mask = torch.rand(q_len, k_len, generator=torch.Generator().manual_seed(1)) < 0.6
        mask[:, 0], mask[1] = True, False
    want = _result(lambda *a, **kw: _reference(*a, **kw).bfloat16(), q, k, v, mask=mask, causal=causal)

    def no_fused(*a, **kw):
        raise AssertionError("the fused kernel ran on CPU in bf16")

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", no_fused)
    got = _result(attention, q, k, v, mask=mask, causal=causal)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert torch.allclose(g, w, atol=0.03, rtol=0.02), (g - w).abs().max()
    if masked:
        assert (got[0][:, :, 1] == 0).all()  # no key allowed: zeros, as SDPA gives


def test_fused_kernel_where_it_is_faster():
    """fp32 on CPU, and any sequence past the unfused path's size, go to F.scaled_dot_product_attention."""
    q, k, v = (t.detach().float() for t in _inputs(9, 9))
    assert torch.equal(attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q, k, v = (t.detach() for t in _inputs(8, 8))
    old, layers.UNFUSED_MAX_SCORES = layers.UNFUSED_MAX_SCORES, 63
    try:
        assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    finally:
        layers.UNFUSED_MAX_SCORES = old
