"""torch integration: the any4::gemm custom op under opcheck, torch.compile and torch.export."""

import pytest
import torch

import any4
import any4.ops  # noqa: F401  (registers torch.ops.any4.gemm)


def make(N=24, K=200, G=64, fmt="any4", dtype=torch.bfloat16):
    w = torch.randn(N, K) * 0.05
    return any4.quantize(w, fmt, group_size=G, dtype=str(dtype).replace("torch.", ""))


class Tiny(torch.nn.Module):
    def __init__(self, qt):
        super().__init__()
        self.register_buffer("packed", qt.packed)
        self.register_buffer("lut", qt.lut)
        self.register_buffer("scales", qt.scales)
        self.group_size = qt.group_size

    def forward(self, x):
        h = torch.ops.any4.gemm(x, self.packed, self.lut, self.scales, self.group_size)
        return torch.nn.functional.silu(h) * 2.0


@pytest.mark.parametrize("fmt", ["any4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(fmt, dtype):
    qt = make(fmt=fmt, dtype=dtype)
    for shape in [(1, 200), (3, 5, 200)]:
        x = torch.randn(*shape, dtype=dtype)
        torch.library.opcheck(torch.ops.any4.gemm.default, (x, qt.packed, qt.lut, qt.scales, 64))


def test_op_equals_function():
    qt = make()
    x = torch.randn(4, 200, dtype=torch.bfloat16)
    assert torch.equal(
        torch.ops.any4.gemm(x, qt.packed, qt.lut, qt.scales, 64),
        any4.gemm(x, qt.packed, qt.lut, qt.scales, 64),
    )


def test_no_graph_breaks():
    m = Tiny(make())
    x = torch.randn(3, 200, dtype=torch.bfloat16)
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_matches_eager():
    torch._dynamo.reset()
    m = Tiny(make())
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for M in (1, 5):  # a second shape exercises the fake implementation with new sizes
        x = torch.randn(M, 200, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), m(x))


def test_export():
    m = Tiny(make())
    x = torch.randn(2, 200, dtype=torch.bfloat16)
    ep = torch.export.export(m, (x,))
    assert any("any4.gemm" in str(n.target) for n in ep.graph.nodes)
    assert torch.equal(ep.module()(x), m(x))


def test_inductor_matches_eager():
    torch._dynamo.reset()
    m = Tiny(make(dtype=torch.float32))
    compiled = torch.compile(m, fullgraph=True)  # default backend: inductor (generates C++)
    x = torch.randn(3, 200)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-6)


def test_gpu_op_fake_shapes_without_a_gpu():
    """The fake of any4::gemm_gpu gives [..., N] in x's dtype (what torch.compile traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 200, dtype=torch.bfloat16)
        codes = torch.empty(2, 4, 32, 16, dtype=torch.uint8)
        scales = torch.empty(2, 4, 8, 4, dtype=torch.bfloat16)
        lut = torch.empty(32, 32, dtype=torch.uint8)
        y = torch.ops.any4.gemm_gpu(x, codes, scales, lut, 24, 200, 64, 16, -1)
        assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not any4.cuda_available(), reason="needs a CUDA device")
def test_quantlinear_gpu_fast_path_compile_and_cuda_graph():
    from any4.nn import QuantLinear

    lin = torch.nn.Linear(256, 72, bias=True)
    q = QuantLinear.from_linear(lin, "any4", 64, table_dtype=torch.bfloat16)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    y_cpu = q(x)
    qc = q.cuda()
    assert qc.kernel_state is not None
    xc = x.cuda()
    y = qc(xc)
    assert (y.float().cpu() - y_cpu.float()).norm() / y_cpu.float().norm() < 1e-2
    compiled = torch.compile(qc, fullgraph=True)
    torch.testing.assert_close(compiled(xc), y)
    static_x = xc.clone()
    qc(static_x)  # warm-up (scratch allocation) before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = qc(static_x)
    static_x.copy_(xc * 2)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, qc(xc * 2))
