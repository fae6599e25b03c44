"""A lossless dictionary code for mostly-zero low-bit weights (QMoE's idea, Tunstall's code).

Quantized weights are small signed levels (ternary {-1, 0, 1}, or 2-bit {-2, -1, 0, 1}). The
code is variable-to-fixed: a dictionary of at most 2^16 *words* (sequences of levels, such as
long runs of zeros with a few ±1 among them), each named by one 16-bit codeword. The words
are the leaves of a complete tree over the levels (Tunstall: the most probable leaf is split
until the dictionary is full), so every sequence of levels parses into words in exactly one
way and the stream reaches the data's entropy as the dictionary grows. Because codewords have
a fixed width, a decoder knows where each one starts without decoding the ones before it.

Layout (what `peakc::linear_compressed` reads, all plain tensors):
  table    int16 [D, 1 + MAX_NONZEROS]   per word: column 0 its length in levels; then its
           non-zero levels in order, each (position << 2) | code with code 1 = +1, 2 = -2,
           3 = -1 (two's complement in 2 bits), 0 = unused slot. Zeros cost nothing to apply,
           so a decoder that multiplies only touches the non-zeros.
  words    int16 [W]    codewords (read as unsigned 16-bit), segment after segment.
  offsets  int32 [R * n_seg + 1]   where segment (row r, segment s) starts in `words`; each
           row of the weight [R, C] is cut into segments of `segment` columns (the last may be
           shorter), each coded on its own, so GPU programs decode rows and segments in
           parallel. A segment's last word may run past its end; the excess is zeros.
  checksum int64 [1]    CRC-32 of words, offsets and table: a decode of damaged bytes is an
           error, never a wrong weight.
"""

from __future__ import annotations

import heapq
import itertools
import math
import zlib
from dataclasses import dataclass

import torch

from peakc.errors import PeakcError

CODEWORD_BITS = 16
MAX_WORDS = 1 << CODEWORD_BITS
MAX_NONZEROS = 7  # non-zero levels per word: the table's row is 1 + 7 int16 values
MAX_LENGTH = 256  # levels per word (runs of zeros longer than this take two words)
TERNARY = (-1, 0, 1)
TWO_BIT = (-2, -1, 0, 1)
_LEVEL_OF_CODE = (0, 1, -2, -1)  # 2-bit code -> level (0 marks an unused slot)


def level_code(level: int) -> int:
    """The 2-bit code of a non-zero level (1 -> 1, -2 -> 2, -1 -> 3)."""
    return level & 3


@dataclass
class CodeDictionary:
    """The words of a code: `lengths[i]` levels, non-zero `(position, level)` pairs in
    `nonzeros[i]`. Build with `tunstall`, or from words/a table (validated: refused unless
    every sequence of levels parses into the words in exactly one way)."""

    lengths: list[int]
    nonzeros: list[tuple[tuple[int, int], ...]]
    alphabet: tuple[int, ...]

    def __post_init__(self) -> None:
        check_unique_parse(self)

    def __len__(self) -> int:
        return len(self.lengths)

    def word(self, i: int) -> tuple[int, ...]:
        """Word i as its sequence of levels."""
        seq = [0] * self.lengths[i]
        for pos, level in self.nonzeros[i]:
            seq[pos] = level
        return tuple(seq)

    @classmethod
    def from_words(cls, words: list[tuple[int, ...]]) -> CodeDictionary:
        """A dictionary of explicit level sequences (its alphabet: the levels that begin one)."""
        alphabet = tuple(sorted({w[0] for w in words if w}))
        nonzeros = [tuple((p, v) for p, v in enumerate(w) if v) for w in words]
        return cls([len(w) for w in words], nonzeros, alphabet)

    @classmethod
    def from_table(cls, table: torch.Tensor) -> CodeDictionary:
        """The dictionary a table holds (layout: module docstring), validated."""
        rows = table.to("cpu", torch.int64).tolist()
        lengths, nonzeros = [], []
        for row in rows:
            lengths.append(row[0])
            nonzeros.append(tuple((e >> 2, _LEVEL_OF_CODE[e & 3]) for e in row[1:] if e & 3))
        alphabet = tuple(sorted({_first_level(n) for n in nonzeros}))
        return cls(lengths, nonzeros, alphabet)

    def table(self) -> torch.Tensor:
        """The int16 table [D, 1 + MAX_NONZEROS] decoders read."""
        rows = []
        for length, nz in zip(self.lengths, self.nonzeros):
            slots = [(pos << 2) | level_code(level) for pos, level in nz]
            rows.append([length, *slots, *[0] * (MAX_NONZEROS - len(slots))])
        return torch.tensor(rows, dtype=torch.int16)


def _first_level(nonzeros: tuple[tuple[int, int], ...]) -> int:
    """A word's first level (zero unless a non-zero sits at position 0)."""
    return nonzeros[0][1] if nonzeros and nonzeros[0][0] == 0 else 0


def check_unique_parse(d: CodeDictionary) -> None:
    """Refuse a dictionary that would not code every sequence in exactly one way: too many
    or empty words, levels outside the alphabet, a word that is a prefix of another (two
    parses), or a tree that is not complete (sequences with no parse: Kraft sum below 1)."""
    if not 0 < len(d) <= MAX_WORDS:
        raise PeakcError(f"code dictionary: {len(d)} words (1 to {MAX_WORDS} allowed)")
    if not set(d.alphabet) <= set(TWO_BIT) or 0 not in d.alphabet or len(d.alphabet) < 2:
        raise PeakcError(f"code dictionary: alphabet {d.alphabet} is not ternary or 2-bit levels")
    arity = len(d.alphabet)
    longest = max(d.lengths)
    for i, (length, nz) in enumerate(zip(d.lengths, d.nonzeros)):
        if not 1 <= length <= MAX_LENGTH or len(nz) > MAX_NONZEROS:
            raise PeakcError(
                f"code dictionary: word {i} has {length} levels and {len(nz)} non-zeros "
                f"(1..{MAX_LENGTH} and at most {MAX_NONZEROS} allowed)"
            )
        positions = [p for p, _ in nz]
        if positions != sorted(set(positions)) or any(p >= length for p in positions):
            raise PeakcError(f"code dictionary: word {i} has misplaced non-zeros {nz}")
        if any(level not in d.alphabet for _, level in nz):
            raise PeakcError(f"code dictionary: word {i} uses a level outside {d.alphabet}")
    rank = {level: r for r, level in enumerate(sorted(d.alphabet))}
    words = sorted((tuple(rank[v] for v in d.word(i)), i) for i in range(len(d)))
    for (a, i), (b, j) in zip(words, words[1:]):
        if b[: len(a)] == a:
            raise PeakcError(
                f"code dictionary: word {i} is a prefix of word {j}: a stream would not "
                "decode uniquely"
            )
    kraft = sum(arity ** (longest - length) for length in d.lengths)
    if kraft != arity**longest:
        raise PeakcError(
            "code dictionary: the words do not cover every sequence of levels (incomplete "
            "tree); some weights would have no code"
        )


def tunstall(
    counts: dict[int, int], alphabet: tuple[int, ...] = TERNARY, size: int = MAX_WORDS
) -> CodeDictionary:
    """Tunstall's dictionary for levels with these counts: split the most probable word
    into its one-level extensions while the dictionary has room. Words stop growing at
    MAX_LENGTH levels or MAX_NONZEROS non-zeros (so decoders have fixed-size table rows)."""
    if size < len(alphabet):
        raise PeakcError(f"code dictionary: {size} words cannot hold the {len(alphabet)} levels")
    total = sum(counts.get(a, 0) for a in alphabet)
    # a little smoothing: a level never seen still gets (short) words, ordered sensibly
    prob = {a: (counts.get(a, 0) + 0.5) / (total + 0.5 * len(alphabet)) for a in alphabet}
    growing: list[tuple[float, int, tuple[int, ...], int]] = []  # (-log p, tick, word, nonzeros)
    final: list[tuple[int, ...]] = []  # words that may not grow any longer
    ticks = itertools.count()  # ties between equally probable words go first-come
    for a in alphabet:
        _keep(growing, final, (-math.log(prob[a]), next(ticks), (a,), int(a != 0)))
    count = len(alphabet)
    while growing and count + len(alphabet) - 1 <= size:
        cost, _, word, nonzero = heapq.heappop(growing)
        for a in alphabet:
            child = (cost - math.log(prob[a]), next(ticks), word + (a,), nonzero + (a != 0))
            _keep(growing, final, child)
        count += len(alphabet) - 1
    return CodeDictionary.from_words(final + [entry[2] for entry in sorted(growing)])


def _keep(growing: list, final: list, entry: tuple[float, int, tuple[int, ...], int]) -> None:
    """Queue a word that may still grow; keep one at a limit as a final word."""
    _, _, word, nonzero = entry
    if len(word) < MAX_LENGTH and nonzero < MAX_NONZEROS:
        heapq.heappush(growing, entry)
    else:
        final.append(word)


# --- the parse tree: encoding ----------------------------------------------------------------


@dataclass
class ParseTree:
    """The dictionary as a tree: `child[node, code]` is an inner node (>= 0) or -(word + 1);
    `finish[node]` is the word reached from an inner node by appending zeros (closes a
    segment that ends inside a word)."""

    child: torch.Tensor  # int64 [nodes, 4], indexed by level_code (0 is the zero level)
    finish: torch.Tensor  # int64 [nodes]
    table: torch.Tensor  # the dictionary's table (what the coded streams are read with)

    @classmethod
    def of(cls, d: CodeDictionary) -> ParseTree:
        child: list[list[int]] = [[0, 0, 0, 0]]
        for i in range(len(d)):
            node = 0
            word = d.word(i)
            for depth, level in enumerate(word):
                code = level_code(level)
                if depth == len(word) - 1:
                    child[node][code] = -(i + 1)
                else:
                    if child[node][code] <= 0:
                        child.append([0, 0, 0, 0])
                        child[node][code] = len(child) - 1
                    node = child[node][code]
        finish = [0] * len(child)
        for node in reversed(range(len(child))):
            nxt = child[node][0]
            finish[node] = -nxt - 1 if nxt < 0 else finish[nxt]
        return cls(
            torch.tensor(child, dtype=torch.int64),
            torch.tensor(finish, dtype=torch.int64),
            d.table(),
        )


@dataclass
class CompressedRows:
    """A coded integer matrix [rows, cols] (layout: module docstring)."""

    words: torch.Tensor
    offsets: torch.Tensor
    table: torch.Tensor
    checksum: torch.Tensor
    rows: int
    cols: int
    segment: int
    max_words: int  # most words in one segment: decoders size their tiles by it

    def nbytes(self, with_table: bool = True) -> int:
        parts = [self.words, self.offsets, self.checksum] + ([self.table] if with_table else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def split_rows(self, counts: list[int]) -> list[CompressedRows]:
        """The streams of consecutive row ranges (`counts` rows each) as matrices of their own
        (segments are coded independently, so this only re-bases the offsets)."""
        n_seg = segments_per_row(self.cols, self.segment)
        offsets = self.offsets.to(torch.int64)
        parts, row = [], 0
        for count in counts:
            span = offsets[row * n_seg : (row + count) * n_seg + 1]
            words = self.words[int(span[0]) : int(span[-1])].clone()
            local = (span - span[0]).to(torch.int32)
            parts.append(
                CompressedRows(
                    words,
                    local,
                    self.table,
                    stream_checksum(words, local, self.table),
                    count,
                    self.cols,
                    self.segment,
                    int((local[1:] - local[:-1]).max()),
                )
            )
            row += count
        return parts

    @classmethod
    def concat(cls, parts: list[CompressedRows]) -> CompressedRows:
        """The matrix of `parts` stacked by rows (one table, cols and segment): `split_rows`
        backwards, so a large matrix can be coded in pieces and stored as one stream."""
        first = parts[0]
        if any((p.cols, p.segment) != (first.cols, first.segment) for p in parts) or any(
            not torch.equal(p.table, first.table) for p in parts[1:]
        ):
            raise PeakcError("compressed rows: parts differ in width, segment or code table")
        offsets, base = [torch.zeros(1, dtype=torch.int64)], 0
        for p in parts:
            offsets.append(p.offsets[1:].to(torch.int64) + base)
            base += p.words.numel()
        words = torch.cat([p.words for p in parts])
        offsets32 = torch.cat(offsets).to(torch.int32)
        return cls(
            words,
            offsets32,
            first.table,
            stream_checksum(words, offsets32, first.table),
            sum(p.rows for p in parts),
            first.cols,
            first.segment,
            max(p.max_words for p in parts),
        )


def segments_per_row(cols: int, segment: int) -> int:
    return max(1, -(-cols // segment))


def encode(
    levels: torch.Tensor,
    dictionary: CodeDictionary,
    segment: int = 1024,
    tree: ParseTree | None = None,
) -> CompressedRows:
    """Code `levels` [rows, cols] (integers in the dictionary's alphabet) segment by segment.

    All segments are parsed together, one column at a time: each keeps its node in the parse
    tree and emits a codeword when it reaches a word's end. The parse runs where `levels` lie
    (a GPU codes a large matrix in a fraction of the CPU's time); the result is on the CPU."""
    if levels.dim() != 2 or levels.numel() == 0:
        raise PeakcError(
            f"encode: expected a non-empty [rows, cols] matrix, got {tuple(levels.shape)}"
        )
    alphabet = torch.tensor(dictionary.alphabet, dtype=levels.dtype, device=levels.device)
    bad = ~torch.isin(levels, alphabet)
    if bool(bad.any()):
        raise PeakcError(
            f"encode: level {int(levels[bad][0])} is outside the dictionary's {dictionary.alphabet}"
        )
    tree = tree or ParseTree.of(dictionary)
    device = levels.device
    child, finish = tree.child.to(device), tree.finish.to(device)
    rows, cols = levels.shape
    n_seg = segments_per_row(cols, segment)
    padded = torch.nn.functional.pad(levels.to(torch.int64), (0, n_seg * segment - cols))
    codes = (padded & 3).view(rows * n_seg, segment).T.contiguous()  # [column, segment]
    del padded
    seg_len = torch.full((n_seg,), segment, dtype=torch.int64, device=device)
    seg_len[-1] = cols - (n_seg - 1) * segment
    seg_len = seg_len.repeat(rows)
    steps = min(segment, cols)
    emitted = torch.full((steps + 1, rows * n_seg), -1, dtype=torch.int64, device=device)
    state = torch.zeros(rows * n_seg, dtype=torch.int64, device=device)
    for t in range(steps):
        nxt = child[state, codes[t]]
        active = seg_len > t
        emitted[t] = torch.where(active & (nxt < 0), -nxt - 1, -1)
        state = torch.where(active, nxt.clamp(min=0), state)
    emitted[steps] = torch.where(state != 0, finish[state], -1)
    del codes
    emitted = emitted.T  # segment-major: the stream's order
    present = emitted >= 0
    words = emitted[present].cpu()
    counts = present.sum(1).cpu()
    offsets = torch.zeros(rows * n_seg + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    words16 = torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)
    offsets32 = offsets.to(torch.int32)
    table = tree.table
    return CompressedRows(
        words16,
        offsets32,
        table,
        stream_checksum(words16, offsets32, table),
        rows,
        cols,
        segment,
        int(counts.max()),
    )


def stream_checksum(
    words: torch.Tensor, offsets: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """CRC-32 of the three code tensors' bytes, as int64 [1]."""
    crc = 0
    for t in (words, offsets, table):
        crc = zlib.crc32(t.detach().to("cpu").contiguous().numpy().tobytes(), crc)
    return torch.tensor([crc], dtype=torch.int64)


# --- decoding --------------------------------------------------------------------------------


def decode(
    words: torch.Tensor,
    offsets: torch.Tensor,
    table: torch.Tensor,
    checksum: torch.Tensor,
    rows: int,
    cols: int,
    segment: int,
    max_words: int,
) -> torch.Tensor:
    """The int8 levels [rows, cols] a stream codes; damaged or inconsistent bytes are a
    PeakcError (checksum, offsets, codewords, or segments whose words do not add up)."""
    check_stream(words, offsets, table, checksum, rows, cols, segment, max_words)
    device = words.device
    n_seg = segments_per_row(cols, segment)
    ids = words.to(torch.int64) & 0xFFFF
    lengths = table[:, 0].to(torch.int64)[ids]
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    seg_of_word = torch.repeat_interleave(torch.arange(rows * n_seg, device=device), counts)
    ends = torch.cumsum(lengths, 0)
    seg_start = torch.cat([ends.new_zeros(1), ends])[offsets[:-1].long()]
    start_in_seg = ends - lengths - seg_start[seg_of_word]
    entries = table[:, 1:].to(torch.int64)[ids]  # [W, MAX_NONZEROS]
    level = torch.tensor(_LEVEL_OF_CODE, device=device)[entries & 3]
    pos = start_in_seg[:, None] + (entries >> 2)
    seg_in_row = seg_of_word % n_seg
    seg_size = torch.clamp(cols - seg_in_row * segment, max=segment)
    keep = (level != 0) & (pos < seg_size[:, None])
    row = (seg_of_word // n_seg)[:, None].expand_as(pos)[keep]
    col = (seg_in_row * segment)[:, None] + pos
    out = torch.zeros(rows, cols, dtype=torch.int8, device=device)
    out[row, col[keep]] = level[keep].to(torch.int8)
    return out


def check_stream(
    words: torch.Tensor,
    offsets: torch.Tensor,
    table: torch.Tensor,
    checksum: torch.Tensor,
    rows: int,
    cols: int,
    segment: int,
    max_words: int,
) -> None:
    """Refuse a stream that does not decode to exactly [rows, cols] levels (see `decode`)."""
    n_seg = segments_per_row(cols, segment)
    if offsets.dim() != 1 or offsets.numel() != rows * n_seg + 1:
        raise PeakcError(
            f"compressed weight: {offsets.numel()} offsets for {rows} rows x {n_seg} segments"
        )
    if (
        table.dim() != 2
        or table.shape[1] != 1 + MAX_NONZEROS
        or not 0 < table.shape[0] <= MAX_WORDS
    ):
        raise PeakcError(f"compressed weight: code table of shape {tuple(table.shape)}")
    if checksum.numel() != 1 or int(checksum.reshape(-1)[0]) != int(
        stream_checksum(words, offsets, table)[0]
    ):
        raise PeakcError("compressed weight: checksum mismatch (the code stream is damaged)")
    off = offsets.to(torch.int64)
    counts = off[1:] - off[:-1]
    if int(off[0]) != 0 or int(off[-1]) != words.numel() or bool((counts < 1).any()):
        raise PeakcError("compressed weight: segment offsets do not cover the code stream")
    if int(counts.max()) > max_words:
        raise PeakcError(
            f"compressed weight: a segment holds {int(counts.max())} words, layout says {max_words}"
        )
    ids = words.to(torch.int64) & 0xFFFF
    if bool((ids >= table.shape[0]).any()):
        raise PeakcError(f"compressed weight: codeword beyond the {table.shape[0]}-word table")
    lengths = table[:, 0].to(torch.int64)[ids]
    if bool((lengths < 1).any()):
        raise PeakcError("compressed weight: the code table has an empty word")
    ends = torch.cumsum(lengths, 0)
    starts = torch.cat([ends.new_zeros(1), ends])
    total = starts[off[1:]] - starts[off[:-1]]
    last = lengths[off[1:] - 1]
    seg_size = torch.clamp(cols - torch.arange(n_seg) * segment, max=segment).repeat(rows)
    seg_size = seg_size.to(total.device)
    if bool(((total < seg_size) | (total - last >= seg_size)).any()):
        raise PeakcError("compressed weight: a segment's words do not add up to its length")


def entropy_bits(levels: torch.Tensor) -> float:
    """Empirical (order-0) entropy of the levels, in bits per level: the bound a code of
    independent levels cannot beat."""
    _, counts = torch.unique(levels, return_counts=True)
    return count_entropy_bits(counts.tolist())


def count_entropy_bits(counts: list[int]) -> float:
    """The order-0 entropy, in bits per level, of levels seen with these counts."""
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts if c) if total else 0.0
