"""Coding large expert weights: streams joined from row pieces (CompressedRows.concat), and
compress_moe's chunked coding of sites larger than one encode call."""

import pytest
import torch

from peakc.errors import PeakcError
from peakc.ir.dictionary_code import CompressedRows, ParseTree, decode, encode, tunstall
from peakc.passes import moe_experts


def _levels(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(-1, 2, (rows, cols), generator=gen, dtype=torch.int8)
    return levels.masked_fill(torch.rand(rows, cols, generator=gen) < 0.8, 0)


def _decoded(c: CompressedRows) -> torch.Tensor:
    return decode(c.words, c.offsets, c.table, c.checksum, c.rows, c.cols, c.segment, c.max_words)


def test_concat_joins_row_pieces_into_the_stream_of_the_whole():
    d = tunstall({-1: 1, 0: 8, 1: 1}, size=128)
    levels = _levels(9, 70, 0)
    whole = encode(levels, d, 32)
    joined = CompressedRows.concat(whole.split_rows([2, 4, 3]))
    assert torch.equal(joined.words, whole.words) and torch.equal(joined.offsets, whole.offsets)
    assert torch.equal(joined.checksum, whole.checksum) and joined.max_words == whole.max_words
    assert torch.equal(_decoded(joined), levels)
    other = encode(levels[:, :64], d, 32)
    with pytest.raises(PeakcError, match="differ in width"):
        CompressedRows.concat([whole, other])


def test_sites_larger_than_a_chunk_are_coded_in_pieces_and_joined(monkeypatch):
    monkeypatch.setattr(moe_experts, "CODE_CHUNK", 7 * 40)  # 7 rows of 40 columns per call

    class Site:
        def __init__(self, module):
            self.module = module

    levels = {"a": _levels(12, 40, 1), "b": _levels(3, 40, 2), "c": _levels(5, 24, 3)}
    sites = [Site(m) for m in levels]
    d = tunstall({-1: 1, 0: 8, 1: 1}, size=128)
    coded = moe_experts.code_sites(sites, levels, d, ParseTree.of(d), 16, torch.device("cpu"))
    for module, want in levels.items():
        c = coded[module]
        assert (c.rows, c.cols) == tuple(want.shape)
        assert torch.equal(_decoded(c), want)
        assert torch.equal(c.words, encode(want, d, 16).words)  # as if coded in one call
