import pytest
import torch

from peakc.ir.ops import dequantize_weight, pack_bits, to_matmul_nbits, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 13), (17, 33), (2, 64)])
def test_pack_unpack_round_trip_is_exact(bits, shape):
    gen = torch.Generator().manual_seed(bits * 100 + shape[1])
    values = torch.randint(0, 1 << bits, shape, generator=gen)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], (shape[1] * bits + 7) // 8)
    assert torch.equal(unpack_bits(packed, bits, shape[1]).long(), values)


def test_four_bit_layout_is_low_nibble_first_and_three_bit_a_bit_stream():
    assert pack_bits(torch.tensor([[1, 2, 3, 4]]), 4).tolist() == [[0x21, 0x43]]
    assert pack_bits(torch.tensor([[1, 2, 3, 4]]), 2).tolist() == [[0b00111001]]
    # 3-bit values 5, 6, 7 occupy bits 0-2, 3-5, 6-8: 5 | 6<<3 | 7<<6 = 0x1F5
    assert pack_bits(torch.tensor([[5, 6, 7]]), 3).tolist() == [[0xF5, 0x01]]


def _random_layer(bits, n, k, gs, gen):
    q = torch.randint(0, 1 << bits, (n, k), generator=gen)
    groups = -(-k // gs)
    scales = torch.rand(n, groups, generator=gen) + 0.1
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen)
    return q, scales, zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_op_is_unpack_dequantize_matmul(bits):
    gen = torch.Generator().manual_seed(bits)
    n, k, gs = 6, 40, 16  # last group partial (8 of 16 columns)
    q, scales, zeros = _random_layer(bits, n, k, gs, gen)
    x = torch.randn(2, 3, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    col_group = torch.arange(k) // gs
    w = (q - zeros[:, col_group]).float() * scales[:, col_group]
    out = torch.ops.peakc.linear_wq(
        x, pack_bits(q, bits), scales, pack_bits(zeros, bits), None, bias, bits, gs, k
    )
    torch.testing.assert_close(out, x @ w.T + bias)
    g_idx = col_group.flip(0).to(torch.int32)
    w2 = (q - zeros[:, g_idx.long()]).float() * scales[:, g_idx.long()]
    out2 = torch.ops.peakc.linear_wq(
        x, pack_bits(q, bits), scales, pack_bits(zeros, bits), g_idx, None, bits, gs, k
    )
    torch.testing.assert_close(out2, x @ w2.T)


def test_fake_gives_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.peakc.linear_wq(
            torch.empty(2, 5, 40),
            torch.empty(6, 20, dtype=torch.uint8),
            torch.empty(6, 3),
            torch.empty(6, 2, dtype=torch.uint8),
            None,
            None,
            4,
            16,
            40,
        )
    assert out.shape == (2, 5, 6)


def test_matmul_nbits_conversion_pads_the_last_block():
    gen = torch.Generator().manual_seed(0)
    n, k, gs = 3, 40, 16
    q, scales, zeros = _random_layer(4, n, k, gs, gen)
    blob, s, z = to_matmul_nbits(pack_bits(q, 4), scales, pack_bits(zeros, 4), 4, gs, k)
    assert blob.shape == (n, 3, 8) and blob.dtype == torch.uint8
    assert s.shape == (n * 3,) and z.shape == (n * 2,)
    padded = torch.nn.functional.pad(q, (0, 48 - k))
    for row in range(n):
        for block in range(3):
            for i in range(8):
                byte = int(blob[row, block, i])
                col = block * gs + 2 * i
                assert byte & 0xF == padded[row, col] and byte >> 4 == padded[row, col + 1]
    assert z[0] & 0xF == zeros[0, 0] and z[0] >> 4 == zeros[0, 1]
    w = dequantize_weight(pack_bits(q, 4), scales, pack_bits(zeros, 4), None, 4, gs, k)
    assert w.shape == (n, k)
