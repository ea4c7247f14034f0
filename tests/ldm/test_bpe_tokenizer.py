"""ldm.modules.tokenizer (our own CLIP BPE) against the transformers-based tokenizer of
ldm.modules.text, which made today's images, and against open_clip.tokenize (SD2's training tokenizer)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from ldm.modules import tokenizer as bpe
from ldm.modules.tokenizer import EOT, SOT, clean_text, tokenize, tokenizer_for
from reference.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
KINDS = ["sd1", "sd2"]

CORPUS = [
    "a photograph of an astronaut riding a horse",
    "",
    "   ",
    "   Extra   spaces\tand\nnewlines\r\n  ",
    "A Painting of a CAT, by Greg Rutkowski; (masterpiece:1.2), [bad hands], ((best quality)), "
    "<lora:add_detail:0.8>, <hypernet:x:1>, {a|b}, \\(escaped\\), (a:1.2) [b] <lora:x:1>",
    "!!!???...,,,;;;:::---___***+++===///\\\\|||~~~```^^^%%%$$$###@@@",
    "wow!!! really?! yes! hello!world (red:1.3)! !",
    "don't won't it's we're they've I'm you'll he'd DON'T It'S We'RE can''t 'twas o'clock rock'n'roll",
    "1234567890 3.14159 $100 #tag @user 1st 2nd 10,000 1e-5 0x1F 8k 4K UHD v1.5",
    "café naïve Ünïcödé résumé façade coöperate",
    "e\u0301 a\u0308 combining, n\u0303o, x\u0323\u0307 q\u0307\u0323 A\u030a \u212b",
    "東京タワー 中文提示词 한국어 日本語のプロンプト ｶﾀｶﾅ",
    "emoji 🐱🚀 👩\u200d👩\u200d👧 ❤️ 🇯🇵 👍🏽 ☕",
    "salt &amp; pepper &lt;b&gt; &quot;quoted&quot; &#39;x&#39; &amp;amp; &nbsp;&copy; &unknown; & ;",
    "\u201ccurly quotes\u201d \u2018single\u2019 \u00abguillemets\u00bb \u201elow\u201c",
    "\uff26\uff35\uff2c\uff2c\u3000width \uff11\uff12\uff13 \uff08paren\uff09",
    "\ufb01ne \ufb02ow \ufb00 \ufb03 ligatures \u0132 \u01c6",
    "tabs\tand\nnewlines\x0bvertical\x0cform\x85nel\u2028line\u2029para\u00a0nbsp\u2003em",
    "a <|startoftext|> b <|endoftext|> c<|endoftext|>d <|ENDOFTEXT|> <start_of_text> <end_of_text>",
    "<|endoftext|>",
    "ΣΑΣ ΟΔΥΣΣΕΥΣ Σ σ ς İstanbul ẞ straße ǅ K Å",
    " ".join(["a very long prompt that goes far past the seventy seven token window"] * 10),
    "mojibake: cafÃ© â€œquotedâ€\x9d",
    "\x1b[31mred\x1b[0m terminal escape, nul\x00 char, del\x7f, bell\x07, unit\x1fsep",
    "Zalgo: Z̴̡̖͎a̸̛̳l̷͙g̶o̴",
    "Arabic: مرحبا بالعالم, Hebrew: שלום, Thai: สวัสดี, Devanagari: नमस्ते",
    "math: x² + y³ = z⁴, ½ ⅓ ¼, ∑∫√∞, ①②③, Ⅻ",
    "zero\u200bwidth\u200djoiner\ufeffbom\u2060wj",
    "word" * 200,
    "a" * 60 + " " + "z" * 33,
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "kavyka x\u1df6\u0301, Malayalam \u0d15\u0d3b\u0d4d, Telugu \u0c15\u0c3c",
    "cat BREAK dog AND moose | pipe",
    " ".join(["cat"] * 74),
    " ".join(["cat"] * 75),
    " ".join(["cat"] * 76),
    ", ".join(["red"] * 40),
]


@pytest.fixture(scope="module")
def old():
    """The transformers-based path the images were first made with."""
    from reference import tokenizer

    return tokenizer


@pytest.fixture(scope="module")
def open_clip():
    import open_clip

    return open_clip


def hf_tokenizer(old, kind):
    return old.tokenizer_for(tiny_config(kind).text)


# --- equality with today's transformers-based path -------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_tokenize_equals_the_transformers_path(old, kind):
    cfg = tiny_config(kind).text
    ours, ref = tokenize(cfg, CORPUS), old.tokenize(cfg, CORPUS)
    assert ours.dtype == torch.long and ours.shape == (len(CORPUS), 77)
    mismatched = [t for t, a, b in zip(CORPUS, ours, ref) if not torch.equal(a, b)]
    assert not mismatched


@pytest.mark.parametrize("kind", KINDS)
def test_encode_equals_the_transformers_tokenizer_without_special_tokens(old, kind):
    """What pipelines/prompts.py needs per piece of a weighted prompt: ids without start/end tokens,
    of cleaned text and (a stronger check of normalisation) of raw text."""
    hf = hf_tokenizer(old, kind)
    ours = tokenizer_for(tiny_config(kind).text)
    texts = CORPUS + [clean_text(t) for t in CORPUS]
    assert [ours.encode(t) for t in texts] == hf(texts, add_special_tokens=False).input_ids


@pytest.mark.parametrize("kind", KINDS)
def test_clean_text_equals_the_transformers_path(old, kind):
    assert [clean_text(t) for t in CORPUS] == [old.clean_text(t) for t in CORPUS]


def test_vocabulary_and_token_ids(old):
    hf = hf_tokenizer(old, "sd1")
    assert bpe.vocabulary() == hf.get_vocab()
    ours = tokenizer_for(tiny_config("sd1").text)
    assert ours.token_to_id(",</w>") == hf.convert_tokens_to_ids(",</w>") == 267
    with pytest.raises(KeyError):
        ours.token_to_id("no such token")


@pytest.mark.parametrize("kind", KINDS)
def test_random_prompts_equal_the_transformers_path(old, kind):
    rng = random.Random(1234)
    pieces = (list("abcdefgXYZ0123456789 .,;:!?'\"()[]{}<>|&#%-_*/\\\t\n")
              + ["'s", "'T", "'re", "'ll", "&amp;", "&lt;", "&#39;", "<|endoftext|>", "<|startoftext|>",
                 "<|EndOfText|>", "é", "e\u0301", "\u0301", "\u0323", "Σ", "ΑΣ", "ß", "İ", "ǅ", "ﬁ", "Ａ",
                 "１", "\u3000", "\x85", "\u2028", "\xa0", "\x0b", "\x1c", "\x00", "\x1b[1m", "½", "²",
                 "東", "京", "タ", "한", "🐱", "👍🏽", "\u200d", "\ufe0f", "\u1df6", "\u0d3b", "\u0c3c",
                 "’", "“", "”", "«", "…", "—", "cat", "photo", "masterpiece", " BREAK "])
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(1500)]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(60, 120))) for _ in range(50)]
    cfg = tiny_config(kind).text
    ours, ref = tokenize(cfg, texts), old.tokenize(cfg, texts)
    assert [t for t, a, b in zip(texts, ours, ref) if not torch.equal(a, b)] == []
    # and the tokenizer alone on raw text, without ftfy in front of it
    hf, mine = hf_tokenizer(old, kind), tokenizer_for(cfg)
    raw = hf(texts, add_special_tokens=False).input_ids
    assert [t for t, r in zip(texts, raw) if mine.encode(t) != r] == []


def _code_point_sample() -> list[str]:
    """Every 61st code point, and every character the Unicode-version tables of ldm.modules.tokenizer
    name, each alone and in contexts that exercise composition, reordering, letters and digits."""
    chars = {chr(c) for c in range(0, sys.maxunicode + 1, 61) if not 0xD800 <= c <= 0xDFFF}
    chars |= {chr(c) for c in bpe._LOWER_EXTRA}
    for table in (bpe._NFC_BARRIERS.pattern[2:-2], bpe._UNICODE_17):
        i = 0
        while i < len(table):
            if i + 2 < len(table) and table[i + 1] == "-":
                chars |= {chr(c) for c in range(ord(table[i]), ord(table[i + 2]) + 1)}
                i += 3
            else:
                chars.add(table[i])
                i += 1
    chars |= {chr(c) for c in range(0x300, 0x370)}  # common combining marks
    chars |= {chr(c) for c in range(0x20, 0x7F)}
    texts = []
    for c in sorted(chars):
        texts += [c, f"a{c}b1", f"!{c}?", f"X{c}\u0301", f"A\u0301{c}\u0334", f"{c}{c}"]
    return texts


@pytest.mark.parametrize("kind", KINDS)
def test_code_points_equal_the_transformers_tokenizer(old, kind):
    texts = _code_point_sample()
    hf, mine = hf_tokenizer(old, kind), tokenizer_for(tiny_config(kind).text)
    ref = hf(texts, add_special_tokens=False).input_ids
    bad = [t for t, r in zip(texts, ref) if mine.encode(t) != r]
    assert not bad, [[hex(ord(c)) for c in t] for t in bad[:10]]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_code_point_equals_the_transformers_tokenizer(old, kind):
    """All of Unicode, each code point alone and between others (about 2 minutes per kind)."""
    cps = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    hf, mine = hf_tokenizer(old, kind), tokenizer_for(tiny_config(kind).text)
    for wrap in ("{}", "a{}b1", "!{}?", "X{}\u0301"):
        texts = [wrap.format(c) for c in cps]
        ref = hf(texts, add_special_tokens=False).input_ids
        bad = [t for t, r in zip(texts, ref) if mine.encode(t) != r]
        assert not bad, [[hex(ord(c)) for c in t] for t in bad[:10]]


def test_combining_mark_order_equals_the_transformers_tokenizer(old):
    """Pairs of combining marks after a letter: NFC's reordering, with the older tables of tokenizers."""
    marks = [chr(c) for c in range(sys.maxunicode + 1)
             if not 0xD800 <= c <= 0xDFFF and unicodedata.combining(chr(c))]
    texts = [f"x{a}{b}" for a in marks for b in marks[::7]]
    hf = hf_tokenizer(old, "sd1")
    norm = hf.backend_tokenizer.normalizer
    assert [t for t in texts if bpe._normalize(t) != norm.normalize_str(t)] == []


# --- structure: special tokens, padding, truncation --------------------------------------------------

@pytest.mark.parametrize("kind, pad", [("sd1", EOT), ("sd2", 0)])
def test_special_tokens_padding_and_truncation(kind, pad):
    cfg = tiny_config(kind).text
    ids = tokenize(cfg, ["", "cat", " ".join(["cat"] * 75), " ".join(["cat"] * 200)])
    assert ids[0].tolist() == [SOT, EOT] + [pad] * 75
    assert ids[1].tolist() == [SOT, 2368, EOT] + [pad] * 74
    assert ids[2].tolist() == [SOT] + [2368] * 75 + [EOT]
    assert ids[3].tolist() == [SOT] + [2368] * 75 + [EOT]  # truncated, the end token kept


def test_special_strings_in_a_prompt():
    tok = tokenizer_for(tiny_config("sd1").text)
    assert tok.encode("<|endoftext|>") == [EOT] and tok.encode("a<|startoftext|>b") == [320, SOT, 321]
    # only the exact lower-case spelling is special; another case is BPE'd as "<|", the name, "|>"
    assert tok.encode("<|ENDOFTEXT|>") == tok.encode("<|") + tok.encode("endoftext") + tok.encode("|>")
    assert EOT not in tok.encode("<|ENDOFTEXT|>")


def test_digits_are_split_one_by_one_and_contractions_kept():
    tok = tokenizer_for(tiny_config("sd1").text)
    assert tok.encode("1234") == [272, 273, 274, 275]
    assert tok.encode("don't") == [847, 713] and tok.encode("DON'T") == [847, 713]


def test_empty_batch_and_string_argument():
    cfg = tiny_config("sd1").text
    assert tokenize(cfg, []).shape == (0, 77)  # the transformers path raises IndexError here
    with pytest.raises(TypeError):
        tokenize(cfg, "a cat")  # the transformers path would tokenize each character
    with pytest.raises(ValueError):
        bpe.ClipTokenizer(pad_id=5)


def test_other_max_length(old):
    from dataclasses import replace

    cfg = replace(tiny_config("sd2").text, max_length=8)
    ids = tokenize(cfg, ["a b c d e f g h", "a"])
    assert ids.tolist() == [[SOT, 320, 321, 322, 323, 324, 325, EOT], [SOT, 320, EOT, 0, 0, 0, 0, 0]]
    assert torch.equal(ids, old.tokenize(cfg, ["a b c d e f g h", "a"]))


# --- open_clip -------------------------------------------------------------------------------------

def _open_clip_differs(text: str) -> bool:
    """The documented differences: "!" under SD2, literal special strings, capital sigma."""
    cleaned = clean_text(text)
    return "!" in cleaned or "<|startoftext|>" in cleaned or "<|endoftext|>" in cleaned or "\u03a3" in cleaned


def test_sd2_equals_open_clip(open_clip):
    texts = [t for t in CORPUS if not _open_clip_differs(t)]
    assert len(texts) > 25
    ours, ref = tokenize(tiny_config("sd2").text, texts), open_clip.tokenize(texts)
    assert [t for t, a, b in zip(texts, ours, ref) if not torch.equal(a, b)] == []


def test_sd1_equals_open_clip_but_pads_with_the_end_token(open_clip):
    texts = [t for t in CORPUS if "<|" not in t and "\u03a3" not in t]  # "!" is plain text under SD1
    ours, ref = tokenize(tiny_config("sd1").text, texts), open_clip.tokenize(texts)
    for text, row, r in zip(texts, ours, ref):
        end = int((r == EOT).nonzero()[0]) + 1
        assert torch.equal(row[:end], r[:end]), text
        assert (row[end:] == EOT).all(), text


def test_documented_differences_from_open_clip(open_clip, old):
    sd1, sd2 = tiny_config("sd1").text, tiny_config("sd2").text
    oc = open_clip.tokenize(["wow!!", "a <|endoftext|> b", "ΟΔΥΣΣΕΥΣ"])
    ours1, ours2 = tokenize(sd1, ["wow!!", "a <|endoftext|> b", "ΟΔΥΣΣΕΥΣ"]), tokenize(sd2, ["wow!!"])
    # SD2's padding token "!" is a special token in transformers: every "!" is its own token, id 0
    assert ours2[0, :5].tolist() == [SOT, 2781, 0, 0, EOT] and oc[0, :4].tolist() == [SOT, 2781, 748, EOT]
    assert ours1[0, :4].tolist() == oc[0, :4].tolist()  # under SD1's rule "!!" is BPE'd as usual
    # a literal "<|endoftext|>" is the end token in transformers, BPE'd text in open_clip 3.x
    assert ours1[1, :5].tolist() == [SOT, 320, EOT, 321, EOT] and oc[1].tolist().count(EOT) == 1
    # ... and open_clip's own spelling "<end_of_text>" is its end token, plain text in transformers
    assert open_clip.tokenize(["a <END_of_text> b"])[0, :4].tolist() == [SOT, 320, EOT, 321]
    row = tokenize(sd1, ["a <END_of_text> b"])[0].tolist()
    assert row[:2] == [SOT, 320] and row.index(EOT) > 4  # "<", "end", "_", ... before the end token
    # a word-final capital sigma: "σ" (per-character lower case) in transformers, "ς" in open_clip
    assert ours1[2].tolist() != oc[2].tolist()
    # and each is what the transformers path gives
    assert torch.equal(ours1, old.tokenize(sd1, ["wow!!", "a <|endoftext|> b", "ΟΔΥΣΣΕΥΣ"]))
    assert torch.equal(ours2, old.tokenize(sd2, ["wow!!"]))


# --- the ASCII shortcut past ftfy ------------------------------------------------------------------

def _full_clean(old, text: str) -> str:
    return old.clean_text(text)  # ftfy.fix_text, html.unescape twice, whitespace folded


def test_ascii_shortcut_equals_ftfy_on_random_ascii(old):
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(128)] + ["&", "&amp;", "&lt;", "&#39;", "&#x41;", "\x1b[31m", "\x1b[0m",
                                               "\r\n", "\r", "\n", "\t", " ", "<", ">", ";", "#", "'", '"']
    plain = 0
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        if bpe._PLAIN_ASCII.fullmatch(text):
            plain += 1
        assert clean_text(text) == _full_clean(old, text), repr(text)
    assert plain > 2000  # the shortcut was taken often enough to mean something
    # text made only of the characters the shortcut accepts: every one of these takes it
    accepted = "".join(chr(c) for c in range(128) if bpe._PLAIN_ASCII.fullmatch(chr(c)))
    for _ in range(20000):
        text = "".join(rng.choice(accepted) for _ in range(rng.randint(0, 40)))
        assert bpe._PLAIN_ASCII.fullmatch(text)
        assert " ".join(text.split()) == _full_clean(old, text), repr(text)


def test_ascii_shortcut_excludes_exactly_what_ftfy_changes(old):
    """Each ASCII character the shortcut sends to ftfy is one ftfy (or html.unescape) can change."""
    for c in map(chr, range(128)):
        if bpe._PLAIN_ASCII.fullmatch(c):
            continue
        text = "&amp;" if c == "&" else f"a{c}b"
        assert " ".join(text.split()) != _full_clean(old, text), repr(c)
    assert not bpe._PLAIN_ASCII.fullmatch("café") and not bpe._PLAIN_ASCII.fullmatch("\x1b[1m")


# --- start-up --------------------------------------------------------------------------------------

def test_tokenize_needs_neither_transformers_nor_open_clip(old):
    script = (
        "import json, sys\n"
        "from ldm.modules.tokenizer import tokenize\n"
        "from reference.tiny import tiny_config\n"
        "sd1, sd2 = tiny_config('sd1').text, tiny_config('sd2').text\n"
        "a = tokenize(sd1, ['a photo of a cat, (best:1.2)', '']).tolist()\n"
        "ascii_only = 'ftfy' not in sys.modules\n"
        "b = tokenize(sd2, ['caf\\u00e9 \\u201cquoted\\u201d \\u6771\\u4eac wow!!']).tolist()\n"
        "loaded = [m for m in ('transformers', 'open_clip', 'tokenizers') if m in sys.modules]\n"
        "print(json.dumps(dict(a=a, b=b, ascii_only=ascii_only, loaded=loaded)))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == [] and got["ascii_only"]
    sd1, sd2 = tiny_config("sd1").text, tiny_config("sd2").text
    assert got["a"] == old.tokenize(sd1, ["a photo of a cat, (best:1.2)", ""]).tolist()
    assert got["b"] == old.tokenize(sd2, ["caf\u00e9 \u201cquoted\u201d \u6771\u4eac wow!!"]).tolist()
