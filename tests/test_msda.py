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


EAGER_BACKENDS = ("gather", "embedding_bag", "level_sum")


def test_backends_listed():
    assert {"pytorch", "gather", "embedding_bag", "level_sum", "triton", "auto"} <= set(available_backends())


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


# ------------------------------------------------------------------------ declarations and resolution


@pytest.fixture
def cuda_only_backend(monkeypatch):
    """A backend declared CUDA-only that ``auto`` would otherwise prefer everywhere."""
    from dinodet.models.ops import msda

    calls = []

    def fake(*args):
        calls.append(args)
        return ms_deform_attn_pytorch(*args)

    backend = msda.MSDABackend("fake_cuda", fake, devices=("cuda",), auto_devices=("cuda", "cpu"))
    monkeypatch.setattr(msda, "_REGISTRY", {"fake_cuda": backend, **msda._REGISTRY})  # registered first
    return calls


def _attention(backend="auto"):
    from dinodet.models.attention import MultiScaleDeformableAttention

    torch.manual_seed(0)
    return MultiScaleDeformableAttention(d_model=8, n_levels=2, n_heads=2, n_points=2, backend=backend)


def _attend(module):
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 5), (2, 3)]
    value = torch.randn(1, sum(h * w for h, w in shapes), 8, generator=g)
    return module(torch.randn(1, 3, 8, generator=g), torch.rand(1, 3, 2, 2, generator=g), value, shapes)


def test_a_cuda_only_backend_is_never_picked_for_the_cpu(cuda_only_backend, caplog, monkeypatch):
    from dinodet.models.attention import configure_msda
    from dinodet.models.ops.msda import select_backend

    monkeypatch.delenv("DINODET_MSDA", raising=False)
    assert select_backend("auto", "cpu") == "embedding_bag"
    assert select_backend("auto", "cuda") == "fake_cuda"
    module = _attention("fake_cuda")
    with caplog.at_level("WARNING", logger="dinodet"):
        assert configure_msda(module, "cpu") == "pytorch"
    assert "MSDA backend 'fake_cuda' does not run on cpu float32 (it supports devices cuda" in caplog.text
    _attend(module)
    assert not cuda_only_backend
    # a module set to it by hand and run on the CPU says what to do instead of failing inside the kernel
    module.use_backend("fake_cuda")
    with pytest.raises(RuntimeError, match=r"runs on cuda, not on cpu: call configure_msda\(model, device\)"):
        _attend(module)


def test_declared_dtypes_and_gradients_are_honoured(monkeypatch):
    from dinodet.models.ops import msda

    monkeypatch.setitem(msda._REGISTRY, "f64_only", msda.MSDABackend(
        "f64_only", ms_deform_attn_pytorch, dtypes=(torch.float64,), grad=False))
    assert msda.select_backend("f64_only", "cpu", torch.float64) == "f64_only"
    assert msda.select_backend("f64_only", "cpu", torch.float32) == "pytorch"
    assert msda.select_backend("f64_only", "cpu", torch.float64, needs_grad=True) == "pytorch"
    assert {n: msda.get_backend(n).exports for n in ("pytorch", "gather", "level_sum", "embedding_bag", "triton")} == {
        "pytorch": ("onnx", "openvino"), "gather": ("onnx", "openvino"), "level_sum": ("onnx", "openvino"),
        "embedding_bag": ("openvino",), "triton": ()}


def test_backend_is_resolved_at_configure_time_only(monkeypatch):
    """The environment variable is read by ``configure_msda``; a forward resolves nothing."""
    from dinodet.models.attention import configure_msda
    from dinodet.models.ops import msda

    module = _attention()
    assert module.backend == "pytorch"  # before any configuration: the reference, which runs anywhere
    monkeypatch.setenv("DINODET_MSDA", "gather")
    assert configure_msda(module, "cpu") == "gather"
    monkeypatch.setenv("DINODET_MSDA", "embedding_bag")

    def no_resolution(*args, **kwargs):
        raise AssertionError("resolved during a forward")

    monkeypatch.setattr(msda, "select_backend", no_resolution)
    monkeypatch.setattr("dinodet.models.attention.select_backend", no_resolution)
    out = _attend(module)
    assert module.backend == "gather"
    monkeypatch.undo()
    monkeypatch.delenv("DINODET_MSDA", raising=False)
    assert configure_msda(module, "cpu") == "embedding_bag"  # the module's own request: auto
    torch.testing.assert_close(_attend(module), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shapes, b, m", [
    (((7, 9), (4, 5), (1, 1)), 2, 2),  # row indices small enough for float32: computed in float
    (((1448, 1448),), 1, 8),  # 8 x 1450^2 rows > 2**24: a float32 index would round, so the heads add in int64
])
def test_embedding_bag_float32_row_indices_are_exact(shapes, b, m):
    value, shapes, loc, w = _inputs(3, shapes=shapes, b=b, lq=5, m=m, d=1, p=2)
    value, loc, w = value.float(), loc.float(), w.float()
    loc[..., 1] = 0.99 + 0.01 * loc[..., 1]  # the bottom rows: the last head's rows there pass 2**24
    ref = ms_deform_attn_pytorch(value, shapes, loc, w)
    # float32 pixel coordinates of a 1448-pixel map carry ~1e-4 of rounding; a wrong row would be off by ~1
    torch.testing.assert_close(ms_deform_attn(value, shapes, loc, w, backend="embedding_bag"), ref,
                               rtol=1e-3, atol=1e-4)
