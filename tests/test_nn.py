"""cellmtl.nn: attention backends agree (with padding and a custom scale), backend resolution, gradient reversal, MLP blocks."""
import math

import pytest
import torch

from cellmtl.nn import (ATTENTION_BACKENDS, FLASH_ATTN_AVAILABLE, attention, flash_varlen_attention, grad_reverse, math_attention, mlp,
                        mlp_layers, resolve_attention_backend, sdpa_attention)


def qkv(batch=3, heads=2, length=7, d_head=4, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, d_head, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


PADDING = torch.arange(7)[None] >= torch.tensor([7, 5, 1])[:, None]  # (B, L) True = pad


@pytest.mark.parametrize("scale", [None, 0.05, 1.0])
def test_math_and_sdpa_agree_with_padding_and_scale(scale):
    q, k, v = qkv()
    torch.testing.assert_close(sdpa_attention(q, k, v, PADDING, scale=scale), math_attention(q, k, v, PADDING, scale=scale), atol=1e-5, rtol=1e-4)


def test_default_scale_is_one_over_sqrt_d_head_and_pads_are_ignored():
    q, k, v = qkv()
    manual = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), -1) @ v
    torch.testing.assert_close(math_attention(q, k, v), manual)
    out = math_attention(q, k, v, PADDING)
    changed = math_attention(q, k.masked_fill(PADDING[:, None, :, None], 9.0), v.masked_fill(PADDING[:, None, :, None], -9.0), PADDING)
    torch.testing.assert_close(out, changed)  # whatever sits in the padded keys and values changes nothing


def test_gradients_agree_between_math_and_sdpa():
    grads = {}
    for backend in ("math", "sdpa"):
        q, k, v = (t.requires_grad_(True) for t in qkv())
        attention(q, k, v, PADDING, backend=backend, scale=0.3).pow(2).sum().backward()
        grads[backend] = [t.grad for t in (q, k, v)]
    for a, b in zip(grads["math"], grads["sdpa"]): torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_backend_resolution_on_cpu_and_bad_names():
    x = torch.zeros(1)
    assert [resolve_attention_backend(b, x) for b in ATTENTION_BACKENDS] == ["sdpa", "sdpa", "sdpa", "math"]
    with pytest.raises(ValueError, match="attention must be one of"): attention(*qkv(), backend="fast")


def test_hrca_style_feature_token_attention():
    "HRCA: one feature per head (d_head 1) scaled by 1/sqrt(d_model/heads); math and SDPA agree."
    q, k, v = qkv(batch=4, heads=8, length=16, d_head=1)
    scale = 1 / math.sqrt(16 / 8)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa", scale=scale), attention(q, k, v, backend="math", scale=scale), atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_flash_kernel_matches_math_on_cuda(dtype):
    "PyTorch's own flash kernel (no flash-attn package needed) against explicit math, in half precision, no padding."
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = qkv(batch=4, heads=8, length=256, d_head=64, dtype=dtype, device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fast = sdpa_attention(q, k, v)
    torch.testing.assert_close(fast.float(), math_attention(q.float(), k.float(), v.float()), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and FLASH_ATTN_AVAILABLE), reason="needs CUDA and the flash-attn extra")
def test_flash_varlen_matches_math_on_real_tokens():
    q, k, v = qkv(length=7, d_head=64, dtype=torch.float16, device="cuda")
    padding = PADDING.cuda()
    keep = ~padding
    out = flash_varlen_attention(q, k, v, padding)
    reference = math_attention(q.float(), k.float(), v.float(), padding)
    torch.testing.assert_close(out.float().transpose(1, 2)[keep], reference.transpose(1, 2)[keep], atol=2e-2, rtol=2e-2)


def test_gradient_reversal_flips_and_scales():
    x = torch.randn(5, 3, requires_grad=True)
    (grad_reverse(x, lambd=0.25) * 4).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5, 3), -1.0))
    assert torch.equal(grad_reverse(x.detach()), x.detach())


def test_mlp_layouts_and_errors():
    kinds = lambda layers: [type(m).__name__ for m in layers]
    assert kinds(mlp([4, 8, 2], norm="batch", dropout=0.5)) == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert kinds(mlp_layers([4, 4, 4], torch.nn.LeakyReLU, norm="layer", norm_after_activation=True, final_activation=True)) == \
        ["Linear", "LeakyReLU", "LayerNorm", "Linear", "LeakyReLU", "LayerNorm"]
    assert mlp([4, 8, 2])(torch.randn(3, 4)).shape == (3, 2)
    with pytest.raises(ValueError, match="norm must be"): mlp([4, 2], norm="group")
    with pytest.raises(ValueError, match="at least the input width"): mlp([])
