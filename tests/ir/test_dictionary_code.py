"""The dictionary code of compressed experts: exact round trips (hypothesis, adversarial
inputs), refused dictionaries, damaged streams, size against entropy, and the reference op."""

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peakc.errors import PeakcError
from peakc.ir.dictionary_code import (
    MAX_NONZEROS,
    TERNARY,
    TWO_BIT,
    CodeDictionary,
    ParseTree,
    decode,
    encode,
    entropy_bits,
    stream_checksum,
    tunstall,
)
from peakc.ir.ops import LINEAR_COMPRESSED


@functools.cache
def _dictionary(alphabet, zero_weight, size):
    counts = {a: (zero_weight if a == 0 else 1) for a in alphabet}
    d = tunstall(counts, alphabet, size)
    return d, ParseTree.of(d)


def _round_trip(levels, alphabet=TERNARY, zero_weight=8, size=256, segment=32):
    d, tree = _dictionary(alphabet, zero_weight, size)
    c = encode(levels, d, segment, tree)
    back = decode(c.words, c.offsets, c.table, c.checksum, c.rows, c.cols, c.segment, c.max_words)
    return c, back


@st.composite
def level_matrices(draw):
    alphabet = draw(st.sampled_from([TERNARY, TWO_BIT]))
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 90))
    kind = draw(st.sampled_from(["random", "zeros", "no_zeros", "one_value", "runs"]))
    if kind == "zeros":
        values = [0] * (rows * cols)
    elif kind == "no_zeros":
        nonzero = [a for a in alphabet if a]
        values = draw(
            st.lists(st.sampled_from(nonzero), min_size=rows * cols, max_size=rows * cols)
        )
    elif kind == "one_value":
        values = [draw(st.sampled_from(alphabet))] * (rows * cols)
    elif kind == "runs":  # long zero runs with rare non-zeros
        values = [0] * (rows * cols)
        for i in draw(st.lists(st.integers(0, rows * cols - 1), max_size=5)):
            values[i] = draw(st.sampled_from([a for a in alphabet if a]))
    else:
        values = draw(
            st.lists(st.sampled_from(alphabet), min_size=rows * cols, max_size=rows * cols)
        )
    settings_ = (draw(st.sampled_from([1, 8, 64])), draw(st.sampled_from([27, 64, 300])))
    segment = draw(st.sampled_from([16, 32, 1024]))
    return alphabet, torch.tensor(values, dtype=torch.int8).view(rows, cols), settings_, segment


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(level_matrices())
def test_code_round_trips_exactly(case):
    alphabet, levels, (zero_weight, size), segment = case
    c, back = _round_trip(levels, alphabet, zero_weight, size, segment)
    assert torch.equal(back, levels)
    assert c.words.dtype == torch.int16 and c.offsets.dtype == torch.int32
    assert c.max_words == int((c.offsets[1:] - c.offsets[:-1]).max())


def test_dictionary_words_respect_the_decoders_limits():
    d, _ = _dictionary(TERNARY, 64, 4096)
    assert len(d) <= 4096 and max(len(n) for n in d.nonzeros) <= MAX_NONZEROS
    assert CodeDictionary.from_table(d.table()).lengths == d.lengths  # a table reads back


@pytest.mark.parametrize(
    "words, needle",
    [
        ([(0,), (1,), (-1,), (0, 1)], "prefix"),  # (0,) begins (0, 1): two parses
        ([(0, 0), (0, 1), (1,), (-1,)], "do not cover"),  # (0, -1) has no word
        ([(0,), (0,), (1,), (-1,)], "prefix"),  # a duplicate is a prefix of itself
        ([(0,), (1,), (-1,), (3,)], "alphabet"),
    ],
)
def test_dictionaries_that_would_not_decode_uniquely_are_refused(words, needle):
    with pytest.raises(PeakcError, match=needle):
        CodeDictionary.from_words(words)


def _coded():
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(-1, 2, (4, 70), generator=gen).to(torch.int8)
    levels[levels.abs() > 0] *= (torch.rand(int((levels != 0).sum()), generator=gen) < 0.3).to(
        torch.int8
    )
    c, _ = _round_trip(levels)
    return c


def _decode(c, words=None, offsets=None, checksum=None, rows=None):
    words = c.words if words is None else words
    offsets = c.offsets if offsets is None else offsets
    checksum = c.checksum if checksum is None else checksum
    return decode(words, offsets, c.table, checksum, rows or c.rows, c.cols, c.segment, c.max_words)


def test_damaged_bytes_fail_the_checksum():
    c = _coded()
    for i in range(c.words.numel()):
        damaged = c.words.clone()
        damaged[i] ^= 1 << (i % 16)
        with pytest.raises(PeakcError, match="checksum"):
            _decode(c, words=damaged)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 15), st.booleans())
def test_damage_behind_a_matching_checksum_is_an_error_or_a_valid_matrix(seed, bit, in_offsets):
    """Even with a forged checksum, bad bytes never crash the decoder or overrun a segment."""
    c = _coded()
    words, offsets = c.words.clone(), c.offsets.clone()
    target = offsets if in_offsets else words
    i = seed % target.numel()
    target[i] ^= 1 << bit
    forged = stream_checksum(words, offsets, c.table)
    try:
        out = _decode(c, words=words, offsets=offsets, checksum=forged)
    except PeakcError:
        return
    assert out.shape == (c.rows, c.cols) and bool((out.abs() <= 2).all())


def test_inconsistent_layout_is_an_error():
    c = _coded()
    with pytest.raises(PeakcError, match="offsets for"):
        _decode(c, rows=c.rows + 1)
    with pytest.raises(PeakcError, match="checksum"):
        _decode(c, checksum=c.checksum + 1)


def test_mostly_zero_ternary_codes_below_one_bit_near_the_entropy():
    """QMoE's regime (~90% zeros): the full 2^16-word dictionary, offsets included."""
    gen = torch.Generator().manual_seed(0)
    levels = torch.multinomial(torch.tensor([0.05, 0.9, 0.05]), 256 * 2048, True, generator=gen) - 1
    levels = levels.view(256, 2048).to(torch.int8)
    counts = {a: int((levels == a).sum()) for a in TERNARY}
    d = tunstall(counts, TERNARY)
    c = encode(levels, d, 1024)
    bits = 8 * c.nbytes(with_table=False) / levels.numel()
    entropy = entropy_bits(levels)
    assert 0.55 < entropy < 0.6
    assert entropy < bits < 1.0 and bits < 1.2 * entropy
    assert torch.equal(_decode(c), levels)


def test_reference_op_is_the_dequantized_matmul():
    c = _coded()
    gen = torch.Generator().manual_seed(1)
    levels = _decode(c)
    scales = torch.rand(c.rows, generator=gen)
    x, bias = torch.randn(3, 5, c.cols, generator=gen), torch.randn(c.rows, generator=gen)
    y = LINEAR_COMPRESSED.overload(
        x, c.words, c.offsets, c.table, c.checksum, scales, bias, c.cols, c.segment, c.max_words
    )
    expected = torch.nn.functional.linear(x, levels.float() * scales[:, None], bias)
    torch.testing.assert_close(y, expected)
