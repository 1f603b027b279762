"""The MSDA op: backends agree with the grid_sample reference, incl. borders and 1x1 levels."""
import pytest
import torch

from dinodet.models.ops.msda import available_backends, ms_deform_attn, ms_deform_attn_pytorch


def _inputs(seed=0, shapes=((7, 9), (4, 5), (1, 1)), b=2, lq=11, m=2, d=3, p=3):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, d, generator=g, dtype=torch.float64)
    # locations spill over the border on purpose (zero padding must match)
    loc = torch.rand(b, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    w = torch.rand(b, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    return value, list(shapes), loc, w / w.sum((-1, -2), keepdim=True)


EAGER_BACKENDS = ("gather", "embedding_bag")


def test_backends_listed():
    assert {"pytorch", "gather", "embedding_bag", "triton", "auto"} <= set(available_backends())


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backend_matches_reference(seed, backend):
    value, shapes, loc, w = _inputs(seed)
    ref = ms_deform_attn_pytorch(value, shapes, loc, w)
    out = ms_deform_attn(value, shapes, loc, w, backend=backend)
    assert out.shape == (2, 11, 6)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_backend_gradients_match(backend):
    value, shapes, loc, w = _inputs(5)
    grads = []
    for name in ("pytorch", backend):
        v, lo, a = (t.clone().requires_grad_() for t in (value, loc, w))
        ms_deform_attn(v, shapes, lo, a, backend=name).square().sum().backward()
        grads.append((v.grad, lo.grad, a.grad))
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_sampling_at_a_pixel_centre_returns_that_pixel():
    value = torch.arange(12, dtype=torch.float64).view(1, 12, 1, 1)  # one 3x4 level
    loc = torch.tensor([(2 + 0.5) / 4, (1 + 0.5) / 3], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    w = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    for backend in ("pytorch", *EAGER_BACKENDS):
        assert ms_deform_attn(value, [(3, 4)], loc, w, backend=backend).item() == 6.0


def test_unknown_backend_is_a_clear_error():
    value, shapes, loc, w = _inputs()
    with pytest.raises(ValueError, match="unknown MSDA backend 'cuda-magic'"):
        ms_deform_attn(value, shapes, loc, w, backend="cuda-magic")


def test_device_constant_is_cached_and_usable_with_autograd():
    """Level sizes and normalisers are built once per size; one first built under inference_mode
    (a predict before training in the same process) must still work in a forward with gradients."""
    from dinodet.models.ops.constants import device_constant

    with torch.inference_mode():
        a = device_constant(((3, 5), (2, 2)), torch.float32, "cpu")
    assert device_constant(((3, 5), (2, 2)), torch.float32, "cpu") is a
    assert device_constant(((3, 5), (2, 2)), torch.float64, "cpu") is not a
    assert a.tolist() == [[3.0, 5.0], [2.0, 2.0]] and not a.is_inference()
    x = torch.ones(2, 2, requires_grad=True)
    (x * a).sum().backward()
    assert torch.equal(x.grad, a)
