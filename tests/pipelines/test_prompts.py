"""Prompt conditioning: A1111 emphasis syntax, 75-token chunks, token weights, cond/uncond padding."""
from __future__ import annotations

import pytest
import torch

from ldm.model import LatentDiffusion
from ldm.modules.tokenizer import EOT, SOT, tokenizer_for
from reference import tokenizer as reference_tokenizer
from pipelines.prompts import (BREAK_MARK, Chunk, chunk_ids, encode_prompts, parse_prompt_attention,
                               tokenize_prompt)
from reference.models import randomize_
from reference.tiny import tiny_config

R, S = 1.1, 1 / 1.1


# --- parsing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("((word))", [("word", R * R)]),
    ("(((word)))", [("word", R * R * R)]),
    ("[word]", [("word", S)]),
    ("[[word]]", [("word", S * S)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 0.5 )", [("word", 0.5)]),
    ("(word:-1)", [("word", -1.0)]),
    ("(word:+2.)", [("word", 2.0)]),
    ("(word:1.0)", [("word", 1.0)]),
    ("a (word:1.0) b", [("a word b", 1.0)]),
    # nesting multiplies, inner factor first
    ("((word:1.5))", [("word", 1.5 * R)]),
    ("(a [b] c)", [("a ", R), ("b", R * S), (" c", R)]),
    ("([b])", [("b", 1.0)]),  # 1/1.1 * 1.1 rounds back to exactly 1.0
    ("(a (b:2) c:3)", [("a ", 3.0), ("b", 6.0), (" c", 3.0)]),
    # adjacent pieces of equal weight merge
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a:b", [("a:b", 1.0)]),
    # escapes
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"\(a\) \[b\]", [("(a) [b]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"(a\)b)", [("a)b", R)]),
    (r"a\b", [("ab", 1.0)]),  # a backslash escaping nothing is dropped
    # unbalanced brackets
    ("(unbalanced", [("unbalanced", R)]),
    ("a [b", [("a ", 1.0), ("b", S)]),
    ("a ((b) c", [("a ", 1.0), ("b", R * R), (" c", R)]),
    ("a) b]", [("a) b]", 1.0)]),
    ("word:1.3)", [("word:1.3)", 1.0)]),
    ("(a:1.2.3)", [("a:1.2.3", R)]),  # malformed weight reads as text
    ("[a:0.5]", [("a:0.5", S)]),  # square brackets take no weight
    ("()", [("", 1.0)]),
    ("", [("", 1.0)]),
    # A1111's documented example, float for float
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # BREAK: an upper-case whole word; the spaces around it go
    ("a BREAK b", [("a", 1.0), BREAK_MARK, ("b", 1.0)]),
    ("a  BREAK  BREAK b", [("a", 1.0), BREAK_MARK, ("", 1.0), BREAK_MARK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", R), BREAK_MARK, ("b", R)]),
    ("BREAKFAST break", [("BREAKFAST break", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), BREAK_MARK, (",b", 1.0)]),
])
def test_parse(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_parse_nested_weights_are_products_not_sums():
    assert parse_prompt_attention("((word))")[0][1] == 1.1 * 1.1
    assert parse_prompt_attention("(a:1.3)")[0][1] == 1.3  # exactly, no 1.1 added by the ")"


# --- tokenisation and chunking -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return tokenizer_for(tiny_config("sd1").text)


def ids(tok, text):
    """The ids of transformers' CLIPTokenizer (the independent reference), no special tokens."""
    return reference_tokenizer.tokenizer_for(tiny_config("sd1").text)(text, add_special_tokens=False).input_ids


def test_plain_prompt_is_one_piece_with_the_tokenizers_ids(tok):
    text = "A photo of an astronaut, riding a horse!"
    [chunk] = tokenize_prompt(tok, text)
    assert chunk.tokens == ids(tok, text) and chunk.weights == [1.0] * len(chunk.tokens)


def test_weights_follow_their_tokens(tok):
    [chunk] = tokenize_prompt(tok, "a (red:1.5) [cat]")
    assert chunk.tokens == ids(tok, "a red cat")
    assert chunk.weights == [1.0, 1.5, S]


@pytest.mark.parametrize("n, sizes", [(0, [0]), (1, [1]), (75, [75]), (76, [75, 1]), (150, [75, 75]),
                                      (151, [75, 75, 1])])
def test_chunks_of_75(tok, n, sizes):
    assert ids(tok, "cat") == [2368]  # one token per word below
    chunks = tokenize_prompt(tok, " ".join(["cat"] * n))
    assert [len(c.tokens) for c in chunks] == sizes


def test_chunk_breaks_after_a_late_comma(tok):
    cat, comma, dog = ids(tok, "cat , dog")
    chunks = tokenize_prompt(tok, " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 20))
    assert chunks[0].tokens == [cat] * 60 + [comma]  # comma 15 tokens before the end: ≤ 20
    assert chunks[1].tokens == [dog] * 20
    assert len(chunks[0].weights) == 61 and len(chunks[1].weights) == 20


def test_chunk_ignores_an_early_comma(tok):
    chunks = tokenize_prompt(tok, " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30))
    assert [len(c.tokens) for c in chunks] == [75, 6]  # comma 25 tokens before the end: > 20
    assert tokenize_prompt(tok, " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30),
                           comma_backtrack=25)[0].tokens[-1] == ids(tok, ",")[0]


def test_chunk_with_a_comma_as_76th_token(tok):
    chunks = tokenize_prompt(tok, " ".join(["cat"] * 75) + ", dog")
    assert [c.tokens for c in chunks] == [[2368] * 75, ids(tok, ", dog")]


def test_break_forces_a_new_chunk(tok):
    sizes = lambda text: [len(c.tokens) for c in tokenize_prompt(tok, text)]  # noqa: E731
    assert sizes("cat BREAK dog") == [1, 1]
    assert sizes("BREAK dog") == [0, 1]  # as A1111: a leading BREAK leaves an empty chunk
    assert sizes("cat BREAK") == [1]  # no trailing empty chunk
    assert sizes("cat BREAK BREAK dog") == [1, 0, 1]
    assert sizes(" ".join(["cat"] * 75) + " BREAK dog") == [75, 1]  # a full chunk is not doubled
    assert sizes("(cat BREAK dog)") == [1, 1]


@pytest.mark.parametrize("kind, pad", [("sd1", EOT), ("sd2", 0)])
@pytest.mark.parametrize("n", [0, 3, 74, 75])
def test_chunk_ids_equal_the_standard_tokenization(kind, pad, n):
    cfg = tiny_config(kind).text
    tok = tokenizer_for(cfg)
    text = " ".join(["cat"] * n)
    [chunk] = tokenize_prompt(tok, text)
    got, weights = chunk_ids(chunk, cfg.pad_token_id)
    assert cfg.pad_token_id == pad
    hf = reference_tokenizer.tokenizer_for(cfg)
    reference = hf(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert got == reference and len(got) == 77 and weights == [1.0] * 77
    assert got[0] == SOT and got[n + 1] == EOT and got[n + 2:] == [pad] * (75 - n)


def test_chunk_ids_reject_an_overfull_chunk():
    with pytest.raises(ValueError, match="at most 75 tokens"):
        chunk_ids(Chunk([1] * 76, [1.0] * 76), 0)


# --- encoding ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request):
    return randomize_(LatentDiffusion(tiny_config(request.param)), seed=3).eval()


@pytest.fixture(scope="module")
def sd1():
    return randomize_(LatentDiffusion(tiny_config("sd1")), seed=4).eval()


def reference(model, texts, clip_skip=0):
    with torch.no_grad():
        return model.get_learned_conditioning(texts, clip_skip=clip_skip)


@pytest.mark.parametrize("prompt", ["a photo of an astronaut riding a horse, detailed",
                                    " ".join(["cat"] * 75), "", "portrait: an old man) smiling"])
def test_short_prompt_equals_standard_conditioning(model, prompt):
    cond, uncond = encode_prompts(model, [prompt], ["blurry, ugly"])
    assert cond.shape == (1, 77, model.config.text.width)
    assert torch.equal(cond, reference(model, [prompt]))
    assert torch.equal(uncond, reference(model, ["blurry, ugly"]))


def test_short_prompt_with_clip_skip(sd1):
    prompt = "a red cube on a table"
    cond, _ = encode_prompts(sd1, [prompt], [""], clip_skip=1)
    assert torch.equal(cond, reference(sd1, [prompt], clip_skip=1))
    assert not torch.allclose(cond, reference(sd1, [prompt]))


def test_weight_one_equals_plain_text(model):
    a, _ = encode_prompts(model, ["a (cat:1.0) on a mat"], [""])
    b, _ = encode_prompts(model, ["a cat on a mat"], [""])
    assert torch.equal(a, b)


def test_long_prompt_is_encoded_in_chunks(model):
    words = (["cat", "dog", "red", "blue"] * 38)[:150]  # 150 tokens, no commas; halves differ
    prompt = " ".join(words)
    cond, uncond = encode_prompts(model, [prompt], [""])
    width = model.config.text.width
    assert cond.shape == uncond.shape == (1, 154, width)
    truncated = reference(model, [prompt])  # the tokenizer keeps the first 75 tokens
    torch.testing.assert_close(cond[:, :77], truncated, rtol=1e-5, atol=1e-6)
    second = reference(model, [" ".join(words[75:])])
    torch.testing.assert_close(cond[:, 77:], second, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cond[:, 77:], cond[:, :77], atol=1e-3)
    # the negative prompt is padded with empty-prompt chunks
    empty = reference(model, [""])
    assert torch.equal(uncond[:, :77], empty) and torch.equal(uncond[:, 77:], empty)


def test_long_negative_pads_the_prompt(sd1):
    cond, uncond = encode_prompts(sd1, ["a cat"], [" ".join(["ugly"] * 80)])
    assert cond.shape == uncond.shape == (1, 154, 32)
    assert torch.equal(cond[:, :77], reference(sd1, ["a cat"]))
    assert torch.equal(cond[:, 77:], reference(sd1, [""]))


def test_batch_is_padded_to_the_longest_and_prompts_are_independent(sd1):
    long = " ".join(["cat"] * 160)
    cond, uncond = encode_prompts(sd1, ["a dog", long], ["", "blurry"])
    assert cond.shape == uncond.shape == (2, 77 * 3, 32)
    alone, _ = encode_prompts(sd1, ["a dog"], [""])
    assert torch.equal(cond[0, :77], alone[0])
    assert torch.equal(cond[0, 77:154], reference(sd1, [""])[0])
    assert torch.equal(uncond[1, :77], reference(sd1, ["blurry"])[0])
    # a single negative prompt applies to every prompt
    _, shared = encode_prompts(sd1, ["a", "b"], ["blurry"])
    assert torch.equal(shared[0], shared[1]) and shared.shape[0] == 2


def test_token_weights_scale_embeddings_and_keep_the_mean(sd1):
    cond, _ = encode_prompts(sd1, ["a (red:1.5) [cube]"], [""])
    with torch.no_grad():
        z = reference(sd1, ["a red cube"])[0]
    w = torch.ones(77)
    w[2], w[3] = 1.5, 1 / 1.1  # positions: start, a, red, cube
    expected = z * w[:, None]
    expected = expected * (z.mean() / expected.mean())
    torch.testing.assert_close(cond[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond.mean(), z.mean(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(cond[0], z, atol=1e-3)


def test_break_changes_conditioning(sd1):
    cond, uncond = encode_prompts(sd1, ["a cat BREAK a dog"], [""])
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(cond[:, :77], reference(sd1, ["a cat"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond[:, 77:], reference(sd1, ["a dog"]), rtol=1e-5, atol=1e-6)


def test_bad_arguments(sd1):
    with pytest.raises(ValueError, match="2 prompts but 3 negative prompts"):
        encode_prompts(sd1, ["a", "b"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="no prompt"):
        encode_prompts(sd1, [], [])
    with pytest.raises(ValueError, match="clip_skip must be an integer from 0 to 2"):
        encode_prompts(sd1, ["a"], [""], clip_skip=3)
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompts(sd1, ["a"], [""], clip_skip=-1)
    with pytest.raises(TypeError, match="list of strings"):
        encode_prompts(sd1, ["a", None], [""])
