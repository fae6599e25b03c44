import torch

from peakc.ir import ops


def test_rms_norm_reference_matches_formula():
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    w = torch.randn(16, dtype=torch.bfloat16)
    xf = x.float()
    expected = w * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
    out = torch.ops.peakc.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def test_rms_norm_fake_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.peakc.rms_norm(torch.empty(3, 8, dtype=torch.float16), torch.empty(8), 1e-6)
    assert out.shape == (3, 8) and out.dtype == torch.float32


def test_lowering_registry():
    assert ops.get_lowering("rms_norm", "toy_backend") is None

    @ops.register_lowering("rms_norm", "toy_backend")
    def lower(node):
        return "lowered"

    assert ops.get_lowering("rms_norm", "toy_backend") is lower
    assert ops.peakc_op_name(torch.ops.peakc.rms_norm.default) == "rms_norm"
    assert ops.peakc_op_name(torch.ops.aten.add.Tensor) is None
    del ops.OPS["rms_norm"].lowerings["toy_backend"]
