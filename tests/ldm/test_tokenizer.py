"""Our offline CLIP tokenizer against ``open_clip.tokenize`` (the tokenizer SD2 was trained with,
and the same BPE as OpenAI CLIP's, which SD1 used)."""
from __future__ import annotations

import pytest
import torch

from ldm.modules.tokenizer import EOT, SOT, tokenize
from reference.tiny import tiny_config

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "   Extra   spaces\tand\nnewlines   ",
    "A Painting of a CAT, by Greg Rutkowski; (masterpiece:1.2), [bad:0.5] <lora:x:1>",
    "café naïve Ünïcödé, e\u0301 combining, 東京タワー, emoji 🐱🚀",
    "don't won't it's we're 1234567 3.14 $100 #tag @user",
    " ".join(["a very long prompt that goes far past the seventy seven token window"] * 10),
]


# open_clip (and OpenAI CLIP) clean text with ftfy.fix_text and html.unescape before BPE: curly
# quotes become straight ones, full-width letters and ligatures plain letters, "&amp;" becomes "&".
NEEDS_CLEANING = [
    "\u201ccurly quotes\u201d and \u2018apostrophes\u2019",
    "\uff26\uff35\uff2c\uff2c width letters",
    "\ufb01ne ligature",
    "salt &amp; pepper, a &lt;b&gt; c",
]


@pytest.mark.parametrize("prompt", NEEDS_CLEANING)
def test_text_is_cleaned_like_open_clip(prompt):
    import open_clip

    assert torch.equal(tokenize(tiny_config("sd2").text, [prompt])[0], open_clip.tokenize([prompt])[0])


@pytest.fixture(scope="module")
def open_clip_ids():
    import open_clip

    return open_clip.tokenize(PROMPTS)


def test_sd2_tokens_equal_open_clip(open_clip_ids):
    ours = tokenize(tiny_config("sd2").text, PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), 77)
    mismatched = [p for p, a, b in zip(PROMPTS, ours, open_clip_ids) if not torch.equal(a, b)]
    assert not mismatched, f"differs from open_clip.tokenize for {mismatched}"
    assert (ours[1, 2:] == 0).all()  # SD2 pads with "!" (id 0)


def test_sd1_tokens_equal_open_clip_but_pad_with_end_token(open_clip_ids):
    ours = tokenize(tiny_config("sd1").text, PROMPTS)
    assert ours.shape == (len(PROMPTS), 77)
    for prompt, row, ref in zip(PROMPTS, ours, open_clip_ids):
        end = int((ref == EOT).nonzero()[0]) + 1  # through the first end token
        assert torch.equal(row[:end], ref[:end]), prompt
        assert (row[end:] == EOT).all(), f"SD1 must pad with <|endoftext|> (49407): {prompt!r}"


def test_special_tokens_and_truncation():
    ids = tokenize(tiny_config("sd1").text, ["", PROMPTS[-1]])
    assert ids[0, 0] == SOT and (ids[0, 1:] == EOT).all()  # empty prompt: start, then end/pad
    assert ids[1, 0] == SOT and ids[1, -1] == EOT and (ids[1, 1:-1] != EOT).all()  # 75 kept
