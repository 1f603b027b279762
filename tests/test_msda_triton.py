"""The Triton MSDA backend (``ops.msda_triton``) against the PyTorch reference, forward and backward.

* Always (CPU, CI): backend resolution on CPU, the custom ops trace under fake tensors, and the kernels
  themselves run through Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before
  ``triton`` is imported, so the cases run in one subprocess: this file executed as a script) on tiny
  CPU tensors: float64/float32/bfloat16/float16, odd shapes, 1xN / Nx1 / 1x1 levels, locations
  outside 0..1 (also huge ones), zeroed (masked) value rows, several query blocks, partial
  ``requires_grad``.
* With CUDA: the compiled kernels -- gradcheck in float64, float32 values and gradients, half types
  loosely, bitwise-deterministic forward, dispatch, torch.compile, memory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dinodet.models.attention import MultiScaleDeformableAttention, configure_msda
from dinodet.models.ops.msda import get_backend, ms_deform_attn, ms_deform_attn_pytorch, select_backend

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # noqa: BLE001
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON),
    reason="needs a CUDA GPU and triton (the compiled kernel); on CPU the kernel is checked through "
           "Triton's interpreter instead (test_interpreter_*)")

ODD_SHAPES = ((7, 9), (4, 5), (1, 1), (1, 3), (3, 1))


def make_inputs(seed=0, shapes=ODD_SHAPES, b=2, lq=11, m=2, d=3, p=3, dtype=torch.float64, device="cpu",
                spill=0.2, masked_rows=0):
    """Random MSDA inputs; locations spill ``spill`` over each border (zero padding must match) and the
    first ``masked_rows`` value rows of batch 0 are zeroed like the caller does for padded tokens."""
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, d, generator=g, dtype=torch.float64)
    if masked_rows:
        value[0, :masked_rows] = 0
    loc = torch.rand(b, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * (1 + 2 * spill) - spill
    w = torch.rand(b, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    w = w / w.sum((-1, -2), keepdim=True)
    return (value.to(device, dtype), list(shapes), loc.to(device, dtype), w.to(device, dtype))


def run_both(fn_ref, fn, value, shapes, loc, w, ref_dtype=None, requires=(True, True, True), seed=7,
             value_dtype=None):
    """(output, grad_value, grad_loc, grad_attn) of ``fn`` and of ``fn_ref`` (inputs cast to ``ref_dtype``)
    for the same random upstream gradient; ``value_dtype`` gives ``fn`` a value of another dtype than
    the locations / weights (as under autocast)."""
    results = []
    for f, dt, vdt in ((fn_ref, ref_dtype or value.dtype, ref_dtype or value.dtype),
                       (fn, value.dtype, value_dtype or value.dtype)):
        ins = [t.detach().to(d).clone().requires_grad_(r) for t, d, r in zip((value, loc, w), (vdt, dt, dt), requires)]
        out = f(ins[0], shapes, ins[1], ins[2])
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        out.backward(go.to(out.device, out.dtype))
        results.append([out.detach()] + [t.grad for t in ins])
    return results


def max_errors(ref, got):
    """Max abs error of each of (out, grad_value, grad_loc, grad_attn), ``None`` where no grad."""
    errs = []
    for r, g in zip(ref, got):
        if r is None or g is None:
            assert r is None and g is None, "gradient present in only one of the two"
            errs.append(None)
        else:
            assert r.shape == g.shape, (r.shape, g.shape)
            errs.append((g.double() - r.double()).abs().max().item())
    return errs


# ----------------------------------------------------------------------------------- backend resolution


def test_triton_is_declared_cuda_only_and_falls_back_to_reference_on_cpu(caplog):
    assert get_backend("triton").devices == ("cuda",)
    with caplog.at_level("WARNING", logger="dinodet"):
        assert select_backend("triton", "cpu") == "pytorch"
    assert "MSDA backend 'triton' does not run on cpu float32" in caplog.text
    assert select_backend("auto", "cpu") == "embedding_bag"  # the fastest CPU backend
    assert select_backend("auto", torch.device("cpu")) == "embedding_bag"
    assert select_backend("auto", "cpu", needs_grad=True) == "pytorch"  # faster backward


def test_env_var_replaces_the_config_choice_but_not_an_override(monkeypatch):
    module = MultiScaleDeformableAttention(d_model=6, n_levels=2, n_heads=2, n_points=2, backend="pytorch")
    monkeypatch.setenv("DINODET_MSDA", "gather")
    assert configure_msda(module, "cpu") == "gather" and module.backend == "gather"
    assert configure_msda(module, "cpu", override="pytorch") == "pytorch"
    monkeypatch.setenv("DINODET_MSDA", "triton")
    assert configure_msda(module, "cpu") == "pytorch"  # cannot run on the CPU: the reference
    value, shapes, loc, w = make_inputs()
    torch.testing.assert_close(ms_deform_attn(value, shapes, loc, w, backend="gather"),
                               ms_deform_attn_pytorch(value, shapes, loc, w), rtol=1e-12, atol=1e-12)


def test_unknown_backend_names_raise(monkeypatch):
    monkeypatch.delenv("DINODET_MSDA", raising=False)
    with pytest.raises(ValueError, match="unknown MSDA backend 'tritonn'"):
        select_backend("tritonn", "cpu")
    monkeypatch.setenv("DINODET_MSDA", "nope")
    with pytest.raises(ValueError, match="unknown MSDA backend 'nope'"):
        configure_msda(MultiScaleDeformableAttention(d_model=6, n_heads=2), "cpu")


@needs_triton
def test_level_tensors_and_config():
    from dinodet.models.ops import msda_triton as mt

    shapes, starts = mt.level_tensors([(7, 9), (4, 5), (1, 1)], "cpu")
    assert shapes.dtype == starts.dtype == torch.int32
    assert shapes.tolist() == [[7, 9], [4, 5], [1, 1]] and starts.tolist() == [0, 63, 83]
    assert mt.level_tensors([(7, 9), (4, 5), (1, 1)], "cpu")[0] is shapes  # built once, cached
    for d in (1, 3, 32, 64, 256):
        for backward in (False, True):
            block_q, warps = mt.kernel_config(d, torch.float32, backward)
            assert block_q & (block_q - 1) == 0 and 16 <= block_q <= 128 and 1 <= warps <= 8
    assert mt.kernel_config(32, torch.float32, False) == (64, 8)
    with pytest.raises(ValueError, match="power of two"):
        mt.set_kernel_config(forward=(48, 4))


@needs_triton
def test_shape_mismatch_is_a_clear_error():
    from dinodet.models.ops.msda_triton import ms_deform_attn_triton

    value, shapes, loc, w = make_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_triton(value, shapes[:-1], loc, w)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_triton(value, shapes, loc, w[..., :2])


@needs_triton
def test_traces_as_opaque_custom_ops():
    """Under fake tensors (what torch.compile / export trace with) forward and backward are the two
    ``dinodet::`` custom ops; no kernel launches, so this runs without a GPU."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from dinodet.models.ops.msda_triton import ms_deform_attn_triton

    def f(v, loc, a):
        v, loc, a = (t.requires_grad_() for t in (v, loc, a))
        out = ms_deform_attn_triton(v, [(3, 4), (1, 1)], loc, a)
        return (out, *torch.autograd.grad(out.sum(), (v, loc, a)))

    v, loc, a = torch.randn(1, 13, 2, 4), torch.rand(1, 5, 2, 2, 2, 2), torch.rand(1, 5, 2, 2, 2)
    gm = make_fx(f, tracing_mode="fake")(v, loc, a)
    code = gm.code
    assert "dinodet.msda_triton_forward" in code and "dinodet.msda_triton_backward" in code
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    shapes = [tuple(n.meta["val"].shape) for n in outs]
    assert shapes == [(1, 5, 8), (1, 13, 2, 4), (1, 5, 2, 2, 2, 2), (1, 5, 2, 2, 2)]


# ------------------------------------------------------------------------- Triton interpreter (CPU)

# name -> (make_inputs kwargs, dtype, reference dtype, requires_grad of (value, loc, attn),
#          forced (BLOCK_Q, num_warps) or None, tolerance on (out, grad_value, grad_loc, grad_attn))
INTERPRETER_CASES = {
    "float64_odd_shapes": (dict(seed=0), "float64", "float64", (True, True, True), None, 1e-12),
    "float32_odd_shapes": (dict(seed=1, masked_rows=10), "float32", "float32", (True, True, True), None, 2e-5),
    "float32_query_blocks": (dict(seed=2, shapes=((5, 6), (2, 3), (1, 1)), b=1, lq=37, m=3, d=8, p=2),
                             "float32", "float32", (True, True, True), (16, 1), 2e-5),
    "bfloat16_vs_float32": (dict(seed=3, shapes=((6, 5), (3, 2)), b=1, lq=9, m=2, d=4, p=2),
                            "bfloat16", "float32", (True, True, True), None, 3e-2),
    "float16_vs_float32": (dict(seed=4, shapes=((6, 5), (3, 2)), b=1, lq=9, m=2, d=4, p=2),
                           "float16", "float32", (True, True, True), None, 4e-3),
    "bfloat16_value_float32_locations": (dict(seed=9, shapes=((6, 5), (3, 2)), b=1, lq=9, m=2, d=4, p=2),
                                         "bfloat16+float32", "float32", (True, True, True), None, 3e-2),
    "float64_only_locations_grad": (dict(seed=5, shapes=((4, 3), (1, 1)), b=1, lq=6, m=1, d=2, p=2),
                                    "float64", "float64", (False, True, False), None, 1e-12),
    "float64_far_out_of_range": (dict(seed=6, shapes=((4, 3), (1, 2)), b=1, lq=6, m=2, d=2, p=2, spill=3.0),
                                 "float64", "float64", (True, True, True), None, 1e-12),
}


def _interpreter_main() -> None:
    """Run INTERPRETER_CASES with the Triton kernels (this process has TRITON_INTERPRET=1) and print JSON."""
    torch.set_num_threads(1)
    from dinodet.models.ops import msda_triton as mt

    results = {}
    for name, (kw, dt, ref_dt, requires, config, _) in INTERPRETER_CASES.items():
        value_dt, _, loc_dt = dt.partition("+")  # "bfloat16+float32": bf16 value, fp32 locations/weights
        value, shapes, loc, w = make_inputs(dtype=getattr(torch, loc_dt or value_dt), **kw)
        mt.set_kernel_config(forward=config, backward=config)
        ref, got = run_both(ms_deform_attn_pytorch, mt.ms_deform_attn_triton, value, shapes, loc, w,
                            ref_dtype=getattr(torch, ref_dt), requires=requires, value_dtype=getattr(torch, value_dt))
        mt.set_kernel_config()
        results[name] = {"errors": max_errors(ref, got),
                         "scales": [None if r is None else r.abs().max().item() for r in ref],
                         "dtypes": [str(t.dtype) if t is not None else None for t in got]}
    # forward determinism: two runs bitwise equal
    value, shapes, loc, w = make_inputs(seed=8, dtype=torch.float32)
    a, b = (mt.ms_deform_attn_triton(value, shapes, loc, w) for _ in range(2))
    results["deterministic_forward"] = bool(torch.equal(a, b))
    # sampling exactly at a pixel centre returns that pixel; huge / nan-free far locations give zeros
    value = torch.arange(12, dtype=torch.float32).view(1, 12, 1, 1)
    loc = torch.tensor([[(2 + 0.5) / 4, (1 + 0.5) / 3], [1e9, -1e9], [-1e30, 0.5]], dtype=torch.float32)
    out = mt.ms_deform_attn_triton(value, [(3, 4)], loc.view(1, 3, 1, 1, 1, 2), torch.ones(1, 3, 1, 1, 1))
    results["pixel_centre_and_huge"] = out.flatten().tolist()
    print("MSDA_INTERPRETER_JSON=" + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    if not HAS_TRITON:
        pytest.skip("the triton package is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DINODET_MSDA", None)
    proc = subprocess.run([sys.executable, __file__, "--interpret"], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MSDA_INTERPRETER_JSON=")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1].split("=", 1)[1])


@pytest.mark.parametrize("case", sorted(INTERPRETER_CASES))
def test_interpreter_kernel_matches_reference(interpreter_results, case):
    _, dt, _, requires, _, tol = INTERPRETER_CASES[case]
    res = interpreter_results[case]
    value_dt, _, loc_dt = dt.partition("+")
    assert res["dtypes"][0] == f"torch.{value_dt}"  # output in value's dtype, grads in their input's
    assert res["dtypes"][2] in (None, f"torch.{loc_dt or value_dt}")
    for what, err, scale, req in zip(("output", "grad value", "grad locations", "grad weights"), res["errors"],
                                     res["scales"], (True, *requires)):
        assert (err is not None) == req, f"{case}: {what} gradient presence"
        if err is not None:  # tolerance relative to the magnitude (grad locations scale with H_l, W_l)
            assert err <= tol * max(1.0, scale), f"{case}: {what} max abs error {err:.3g} > {tol:.3g} * {scale:.3g}"


def test_interpreter_forward_is_deterministic(interpreter_results):
    assert interpreter_results["deterministic_forward"]


def test_interpreter_pixel_centre_and_huge_locations(interpreter_results):
    assert interpreter_results["pixel_centre_and_huge"] == [6.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------- CUDA


@needs_cuda
def test_cuda_gradcheck_float64():
    from dinodet.models.ops.msda_triton import ms_deform_attn_triton

    value, shapes, loc, w = make_inputs(seed=10, b=1, lq=5, m=2, d=3, p=2, device="cuda")
    ins = [t.clone().requires_grad_() for t in (value, loc, w)]
    # grad_value is accumulated with atomics: allow last-bit differences between two backward runs
    assert torch.autograd.gradcheck(lambda v, loc, a: ms_deform_attn_triton(v, shapes, loc, a), ins,
                                    eps=1e-6, atol=1e-5, nondet_tol=1e-12)


@needs_cuda
@pytest.mark.parametrize("kw", [
    dict(seed=0),
    dict(seed=1, masked_rows=20, spill=0.5),
    dict(seed=2, shapes=((13, 17), (7, 9), (4, 5), (2, 3)), b=2, lq=300, m=8, d=32, p=4),
    dict(seed=3, shapes=((1, 1), (1, 7), (5, 1)), b=1, lq=129, m=3, d=5, p=1),
    dict(seed=4, shapes=((9, 11),), b=3, lq=70, m=1, d=64, p=5, spill=1.0),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_reference(kw, dtype):
    from dinodet.models.ops.msda_triton import ms_deform_attn_triton

    value, shapes, loc, w = make_inputs(dtype=dtype, device="cuda", **kw)
    ref, got = run_both(ms_deform_attn_pytorch, ms_deform_attn_triton, value, shapes, loc, w)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for what, err, r in zip(("output", "grad value", "grad locations", "grad weights"), max_errors(ref, got), ref):
        scale = max(1.0, r.abs().max().item())  # d/dloc scales with H_l, W_l; grad value sums many queries
        assert err <= tol * scale, f"{what}: {err:.3g} (scale {scale:.3g})"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_types_vs_float32_reference(dtype):
    from dinodet.models.ops.msda_triton import ms_deform_attn_triton

    value, shapes, loc, w = make_inputs(seed=5, shapes=((13, 17), (7, 9), (1, 1)), b=2, lq=200, m=4, d=32, p=4,
                                        dtype=dtype, device="cuda")
    ref, got = run_both(ms_deform_attn_pytorch, ms_deform_attn_triton, value, shapes, loc, w,
                        ref_dtype=torch.float32)
    assert all(t.dtype == dtype for t in got)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for what, err, r in zip(("output", "grad value", "grad locations", "grad weights"), max_errors(ref, got), ref):
        assert err <= tol * max(1.0, r.abs().max().item()), f"{what}: {err:.3g}"


@needs_cuda
def test_cuda_bfloat16_value_with_float32_locations():
    """Under autocast the value projection is bf16 while locations / weights stay fp32."""
    from dinodet.models.ops.msda_triton import ms_deform_attn_triton

    value, shapes, loc, w = make_inputs(seed=11, shapes=((13, 17), (7, 9), (1, 1)), b=1, lq=100, m=4, d=32, p=4,
                                        dtype=torch.float32, device="cuda")
    ref, got = run_both(ms_deform_attn_pytorch, ms_deform_attn_triton, value, shapes, loc, w,
                        value_dtype=torch.bfloat16)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for what, err, r in zip(("output", "grad value", "grad locations", "grad weights"), max_errors(ref, got), ref):
        assert err <= 3e-2 * max(1.0, r.abs().max().item()), f"{what}: {err:.3g}"


@needs_cuda
def test_cuda_forward_is_bitwise_deterministic():
    from dinodet.models.ops.msda_triton import ms_deform_attn_triton

    value, shapes, loc, w = make_inputs(seed=6, shapes=((50, 60), (25, 30), (13, 15), (7, 8)), b=2, lq=3000,
                                        m=8, d=32, p=4, dtype=torch.float32, device="cuda")
    a = ms_deform_attn_triton(value, shapes, loc, w)
    b = ms_deform_attn_triton(value, shapes, loc, w)
    assert torch.equal(a, b)


@needs_cuda
def test_cuda_dispatch_and_compile(monkeypatch):
    monkeypatch.delenv("DINODET_MSDA", raising=False)
    assert select_backend("auto", "cuda") == "triton"
    assert select_backend("triton", "cuda", needs_grad=True) == "triton"
    module = MultiScaleDeformableAttention(d_model=6, n_heads=2).cuda()
    assert configure_msda(module, "cuda") == "triton"
    value, shapes, loc, w = make_inputs(seed=7, dtype=torch.float32, device="cuda")
    eager = ms_deform_attn(value, shapes, loc, w, backend="triton")
    torch.testing.assert_close(eager, ms_deform_attn_pytorch(value, shapes, loc, w), rtol=1e-5, atol=1e-5)
    compiled = torch.compile(lambda v, loc, a: ms_deform_attn(v, shapes, loc, a, backend="triton"), fullgraph=True)
    ins = [t.clone().requires_grad_() for t in (value, loc, w)]
    out = compiled(*ins)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in ins)


@needs_cuda
def test_cuda_uses_less_memory_than_reference():
    from dinodet.models.ops.msda_triton import ms_deform_attn_triton

    value, shapes, loc, w = make_inputs(seed=8, shapes=((40, 50), (20, 25), (10, 13), (5, 7)), b=1, lq=2000,
                                        m=8, d=32, p=4, dtype=torch.float32, device="cuda")
    peaks = []
    for fn in (ms_deform_attn_pytorch, ms_deform_attn_triton):
        ins = [t.clone().requires_grad_() for t in (value, loc, w)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(ins[0], shapes, ins[1], ins[2]).sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] <= peaks[0], peaks


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    _interpreter_main()
