"""CLIP's byte-level BPE tokenizer, without transformers or open_clip.

Gives the same ids as the ``transformers.CLIPTokenizer`` that ``ldm.modules.text`` builds from the BPE
file open-clip-torch ships (the tokenizer the images were made with), at a fraction of its import
cost: the module imports only the standard library; ``regex`` (for ``\\p{L}``/``\\p{N}``) and the
vocabulary load on first use, ``ftfy`` only for text that may need fixing, ``torch`` in
:func:`tokenize` only.

Steps, in transformers' order:

1. :func:`clean_text` (done by :func:`tokenize`, by the caller for :meth:`ClipTokenizer.encode`):
   ``ftfy.fix_text``, HTML entities unescaped twice, whitespace runs folded to one space, stripped.
2. The special strings ``<|startoftext|>`` / ``<|endoftext|>`` (and, for SD2's tokenizer, which pads
   with ``!``, every ``!``) are cut out of the raw text first, case-sensitively, and become their ids.
3. Each remaining segment: NFC, whitespace runs to one space, lower case character by character.
4. Pre-tokenisation: CLIP's pattern (specials, 's 't 're 've 'm 'll 'd, letter runs, single digits,
   runs of anything else; whitespace dropped), then GPT-2's byte-level pattern on each piece (it
   only splits a special string that reached this step in another case: ``<|`` ``endoftext`` ``|>``).
5. Each piece's UTF-8 bytes mapped to printable symbols, ``</w>`` added to the last one, and pairs
   merged in rank order.

Known differences from ``open_clip.tokenize`` (all follow today's transformers-based path):

- ``!`` under SD2's tokenizer is always its own token, id 0: ``"wow!!"`` → ``wow</w> ! !`` (0, 0);
  open_clip gives ``!!</w>`` (748) and a lone ``"!"`` is ``!</w>`` (256) there.
- The literal strings ``<|startoftext|>`` / ``<|endoftext|>`` in a prompt are the special ids 49406 /
  49407; open_clip 3.x BPE-encodes them, and instead takes its own spellings ``<start_of_text>`` /
  ``<end_of_text>`` (and in any case) for the special ids, which are plain text here.
- A capital ``Σ`` is lower-cased to ``σ`` even at the end of a word (open_clip: ``ς``).
"""
from __future__ import annotations

import functools
import importlib.util
import re
import unicodedata
import zlib
from collections.abc import Iterable
from pathlib import Path

SOT, EOT = 49406, 49407
SOT_TEXT, EOT_TEXT = "<|startoftext|>", "<|endoftext|>"
BANG = 0  # id of "!", SD2's padding token
VOCAB_SIZE = 49408
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # merge lines used, after the header line: 48894

# Text that ftfy.fix_text and html.unescape provably leave alone: printable ASCII except "&" (HTML
# entities), and the whitespace ftfy keeps or turns into "\n" (\t \n \x0c \r). Everything else
# (other control characters, ESC of terminal escapes, any non-ASCII) goes through ftfy.
_PLAIN_ASCII = re.compile(r"[\t\n\x0c\r\x20-\x25\x27-\x7e]*")

# The special strings transformers cuts out before normalising (its "added tokens").
_ADDED = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_ADDED_WITH_BANG = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>|!)")
# Whitespace as the tokenizers library's normaliser (Oniguruma's \s) sees it: Unicode's White_Space
# characters, which is str.isspace() less U+001C..U+001F (to Oniguruma those are "other" characters).
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r\x85 \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")

# The tokenizers library's Unicode data is not Python's, and it differs by component. What follows
# makes ours agree with tokenizers 0.23 under Python 3.11 (Unicode 14) character by character (checked
# over every code point; tests/ldm/test_bpe_tokenizer.py checks a sample and all the characters below):
#
# - NFC: its tables predate Unicode 10. These combining marks (Unicode 10-14; non-zero combining class
#   in Python) are unknown to it, so they act as starters: nothing is reordered or composed across
#   them. U+11930 is the second half of a composition (U+11938) Unicode 13 added.
_NFC_BARRIERS = re.compile(
    "([\u07fd\u0898-\u089f\u08ca-\u08d3\u09fe\u0c3c\u0d3b-\u0d3c\u0eba\u1715\u1abf-\u1ace"
    "\u1df6-\u1dfa\ua82c\U00010d24-\U00010d27\U00010eab-\U00010eac\U00010f46-\U00010f50"
    "\U00010f82-\U00010f85\U00011070\U0001133b\U0001145e\U00011839-\U0001183a\U0001193d-\U0001193e"
    "\U00011943\U000119e0\U00011a34\U00011a47\U00011a99\U00011d42\U00011d44-\U00011d45\U00011d97"
    "\U00016ff0-\U00016ff1\U0001e130-\U0001e136\U0001e2ae\U0001e2ec-\U0001e2ef\U00011930])")
# - Lower case: Rust's (Unicode 17) maps these letters, unassigned in Python 3.11's Unicode 14.
_LOWER_EXTRA = {
    0x1C89: 0x1C8A, 0xA7CB: 0x0264, 0xA7CC: 0xA7CD, 0xA7CE: 0xA7CF, 0xA7D2: 0xA7D3, 0xA7D4: 0xA7D5,
    0xA7DA: 0xA7DB, 0xA7DC: 0x019B,
    **{c: c + 0x20 for c in range(0x10D50, 0x10D66)},  # Garay
    **{c: c + 0x1B for c in range(0x16EA0, 0x16EB9)},  # Beria Erfe
}
# - Letters and digits: Oniguruma's tables are Unicode 16; these letters and numbers, new in Unicode
#   17, which the regex package knows, are "other" characters to it.
_UNICODE_17 = (
    "\u0558\u058b-\u058c\u088f\u0c5c\u0cdc\u208f\u209d-\u209f\ua7ce-\ua7cf\ua7d2\ua7d4\ua7dd\ua7e2"
    "\ua7f1\uab6c-\uab6d\U000107bb-\U000107bf\U00010940-\U00010959\U00010ec5-\U00010ec7"
    "\U00010ed9-\U00010eee\U00011b0a\U00011db0-\U00011ddb\U00011de0-\U00011de9\U00011df1\U0001246f"
    "\U00012475-\U0001247f\U00012550-\U00012686\U00016ea0-\U00016eb8\U00016ebb-\U00016ed3"
    "\U00016ff2-\U00016ff6\U000187f8-\U000187ff\U00018cd6-\U00018cda\U00018d09-\U00018d20"
    "\U00018d80-\U00018df2\U00018e00-\U00019191\U000191a0-\U000191d2\U0001b123-\U0001b128\U0001b168"
    "\U0001d6a6\U0001df1f-\U0001df24\U0001df2b-\U0001df81\U0001df90-\U0001df96\U0001dfcd-\U0001dfff"
    "\U0001e6c0-\U0001e6de\U0001e6e0-\U0001e6e2\U0001e6e4-\U0001e6e5\U0001e6e7-\U0001e6ed"
    "\U0001e6f0-\U0001e6f4\U0001e6fe-\U0001e6ff\U0002b73a-\U0002b73f\U0002b81e\U0002cea2-\U0002cead"
    "\U000323b0-\U00033479\U0003d000-\U0003fc3f")


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file that open-clip-torch ships (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is not installed; it provides the CLIP BPE vocabulary")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP BPE vocabulary not found at {path}")
    return path


def clean_text(text: str) -> str:
    """CLIP's cleaning before BPE: ``ftfy.fix_text``, HTML entities unescaped twice, whitespace runs
    folded to one space and stripped. Plain ASCII text skips ftfy (it would return it unchanged)."""
    if _PLAIN_ASCII.fullmatch(text) is None:
        import html

        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


def _byte_symbols() -> list[str]:
    """The printable symbol standing for each byte value 0..255 (GPT-2's reversible byte map): bytes
    that are printable Latin-1 stand for themselves, the others take code points from 256 upwards."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {}
    spare = 256
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(spare)
            spare += 1
    return [table[b] for b in range(256)]


_BYTE_SYMBOLS = _byte_symbols()


def _vocabulary_order() -> list[str]:
    # the byte symbols in CLIP's order: the printable bytes first, then the rest
    printable = [b for b in range(256) if _BYTE_SYMBOLS[b] == chr(b)]
    rest = [b for b in range(256) if _BYTE_SYMBOLS[b] != chr(b)]
    return [_BYTE_SYMBOLS[b] for b in printable + rest]


def _merge_lines() -> list[str]:
    """The merge lines CLIP uses ("first second"), decompressing only as much of the file as holds them."""
    need = _N_MERGES + 1  # the header line, then the merges
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    parts, newlines = [], 0
    with open(clip_bpe_path(), "rb") as f:
        while newlines < need:
            block = f.read(1 << 16)
            if not block:
                break
            part = inflate.decompress(block)
            parts.append(part)
            newlines += part.count(b"\n")
    data = b"".join(parts)
    lines = data[: data.rfind(b"\n")].decode("utf-8").split("\n", need)[1:need]
    if len(lines) != _N_MERGES:
        raise RuntimeError(f"unexpected CLIP BPE file {clip_bpe_path()}: fewer than {_N_MERGES} merges")
    return lines


# Ids: the 256 byte symbols (printable bytes first), the same with "</w>", then one token per merge
# line in file order (the merge of rank r makes token 512 + r), then <|startoftext|>, <|endoftext|>.
_SYMBOL_IDS = {sym: i for i, sym in enumerate(_vocabulary_order())}
_SYMBOL_IDS.update({sym + "</w>": i + 256 for sym, i in list(_SYMBOL_IDS.items())})


@functools.lru_cache(maxsize=None)
def _ranks() -> dict[str, int]:
    """"first second" → rank of that merge, read once."""
    return {line: rank for rank, line in enumerate(_merge_lines())}


@functools.lru_cache(maxsize=None)
def vocabulary() -> dict[str, int]:
    """All 49408 tokens → ids (built on first call; tokenising does not need it)."""
    tokens = [*_SYMBOL_IDS, *[m.replace(" ", "") for m in _merge_lines()], SOT_TEXT, EOT_TEXT]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"unexpected CLIP BPE file {clip_bpe_path()}: {len(vocab)} distinct tokens")
    return vocab


# CLIP's pre-tokenisation: special strings, English contractions, letter runs, single digits, runs of
# other non-space characters; matches are kept, the whitespace between them dropped. For ASCII text
# (after lower-casing and folding whitespace to " ") the standard library's re does it.
_ASCII_PIECES = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                           r"|[a-z]+|[0-9]|[^ a-z0-9]+")


@functools.lru_cache(maxsize=None)
def _unicode_pieces():
    import regex

    new = f"[{_UNICODE_17}]"
    letter, digit = rf"[\p{{L}}--{new}]", rf"[\p{{N}}--{new}]"
    return regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                         rf"|{letter}+|{digit}|(?:[^\s\p{{L}}\p{{N}}]|{new})+", regex.V1)


def _pieces(text: str) -> list[str]:
    return (_ASCII_PIECES if text.isascii() else _unicode_pieces()).findall(text)


@functools.lru_cache(maxsize=1 << 16)
def _bpe(word: str) -> tuple[int, ...]:
    """Ids of one pre-tokenised piece: its bytes as symbols, ``</w>`` on the last, then merges.

    Each round merges every occurrence, left to right, of the lowest-ranked adjacent pair."""
    ranks = _ranks()
    parts = [_BYTE_SYMBOLS[b] for b in word.encode("utf-8")]
    parts[-1] += "</w>"
    ids = [_SYMBOL_IDS[p] for p in parts]
    while len(parts) > 1:
        best, best_rank = -1, _N_MERGES
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + " " + parts[i + 1], _N_MERGES)
            if r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        first, second = parts[best], parts[best + 1]
        new_parts, new_ids = parts[:best], ids[:best]
        i, n = best, len(parts)
        while i < n:
            if i + 1 < n and parts[i] == first and parts[i + 1] == second:
                new_parts.append(first + second)
                new_ids.append(512 + best_rank)
                i += 2
            else:
                new_parts.append(parts[i])
                new_ids.append(ids[i])
                i += 1
        parts, ids = new_parts, new_ids
    return tuple(ids)


def _nfc(text: str) -> str:
    if _NFC_BARRIERS.search(text) is None:
        return unicodedata.normalize("NFC", text)
    return "".join(p if i % 2 else unicodedata.normalize("NFC", p)
                   for i, p in enumerate(_NFC_BARRIERS.split(text)))


def _lower(text: str) -> str:
    # Character by character, as the tokenizers library does: str.lower() would turn a word-final
    # capital sigma into "ς" (its only context-dependent mapping); transformers gives "σ".
    if "\u03a3" in text:
        text = "".join(c.lower() for c in text)
    else:
        text = text.lower()
    if not text.isascii() and max(text) >= "\u1c89":
        text = text.translate(_LOWER_EXTRA)
    return text


def _normalize(text: str) -> str:
    """What transformers' normaliser does to a segment: NFC, whitespace runs to " ", lower case."""
    if not text.isascii():
        text = _nfc(text)
    return _lower(_WHITESPACE.sub(" ", text))


def _encode_segment(text: str, out: list[int]) -> None:
    text = _normalize(text)
    for piece in _pieces(text):
        if piece == SOT_TEXT or piece == EOT_TEXT:
            # a special string in another case, lower-cased here: GPT-2's byte-level pattern, which
            # transformers applies after CLIP's, cuts it into "<|", the name, "|>"
            out += _bpe("<|")
            out += _bpe(piece[2:-2])
            out += _bpe("|>")
        else:
            out += _bpe(piece)


class ClipTokenizer:
    """CLIP BPE with one padding rule: ``pad_id`` 49407 (SD1: ``<|endoftext|>``) or 0 (SD2: ``!``).

    As in transformers, the padding token is a special token, so under SD2's rule every ``!`` in a
    prompt is cut out as its own token (id 0) before BPE.
    """

    def __init__(self, pad_id: int = EOT, max_length: int = 77):
        if pad_id not in (EOT, BANG):
            raise ValueError(f"pad_id must be {EOT} (<|endoftext|>) or {BANG} (!), got {pad_id}")
        self.pad_id = pad_id
        self.max_length = max_length
        self._added = _ADDED if pad_id == EOT else _ADDED_WITH_BANG

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without start/end tokens and without truncation. The text is not cleaned:
        pass it through :func:`clean_text` first, as :meth:`__call__` does."""
        out: list[int] = []
        for i, part in enumerate(self._added.split(text)):
            if i % 2:
                out.append(SOT if part == SOT_TEXT else EOT if part == EOT_TEXT else BANG)
            elif part:
                _encode_segment(part, out)
        return out

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary entry, e.g. ``",</w>"``; KeyError when there is none."""
        found = _SYMBOL_IDS.get(token)
        return vocabulary()[token] if found is None else found

    def ids(self, text: str) -> list[int]:
        """``max_length`` ids of a cleaned text: start, at most ``max_length - 2`` tokens, end, padding."""
        body = self.encode(text)[: self.max_length - 2]
        return [SOT, *body, EOT] + [self.pad_id] * (self.max_length - 2 - len(body))

    def __call__(self, texts: Iterable[str]) -> list[list[int]]:
        """Rows of :meth:`ids` for each text after :func:`clean_text`."""
        if isinstance(texts, str):
            raise TypeError("pass a list of strings, not a string")
        return [self.ids(clean_text(t)) for t in texts]


@functools.lru_cache(maxsize=None)
def clip_tokenizer(pad_id: int = EOT, max_length: int = 77) -> ClipTokenizer:
    return ClipTokenizer(pad_id, max_length)


def tokenizer_for(cfg) -> ClipTokenizer:
    """The tokenizer of a ``TextEncoderConfig``: SD1 pads with ``<|endoftext|>``, anything else with
    ``!`` (id 0), as ``ldm.modules.text.tokenizer_for`` does."""
    return clip_tokenizer(EOT if cfg.pad_token_id == EOT else BANG, cfg.max_length)


def tokenize(cfg, texts: list[str]):
    """LongTensor (len(texts), cfg.max_length): start token, up to max_length - 2 tokens, end, padding."""
    import torch

    rows = tokenizer_for(cfg)(texts)
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), cfg.max_length)
