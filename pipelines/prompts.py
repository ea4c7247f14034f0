"""Prompt conditioning as AUTOMATIC1111's web UI does it: emphasis syntax, prompts longer than CLIP's
75 tokens encoded in chunks, and per-token weights applied to the text encoder's output.

Syntax (weights multiply when nested; adjacent pieces of equal weight are merged)::

    (word)        weight × 1.1            ((word))     × 1.21
    [word]        weight ÷ 1.1            (word:1.3)   explicit weight 1.3
    \\( \\) \\[ \\] \\\\   literal bracket or backslash
    BREAK         (upper case, a whole word) ends the current 75-token chunk

An unclosed ``(`` or ``[`` applies to the rest of the prompt; a stray ``)`` or ``]`` is plain text.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch

from ldm.modules.tokenizer import EOT, SOT, clean_text, tokenizer_for

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
BREAK_MARK = ("BREAK", -1.0)  # how a BREAK keyword appears in the parsed list, as in A1111
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"

_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")
_WEIGHT_RE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_ESCAPABLE = "()[]\\"
_SPECIAL = "()[]\\:"


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` pieces; a BREAK keyword becomes ``("BREAK", -1.0)``.

    Follows A1111's documented behaviour. Two deliberate differences, both on input A1111 mishandles:
    a BREAK inside brackets still breaks (A1111 scales its marker and then emits the word "BREAK"),
    and a malformed weight such as ``(a:1.2.3)`` reads as text (A1111 raises).
    """
    pieces: list[list] = []  # [text, weight, is_break]
    opened: dict[str, list[int]] = {"(": [], "[": []}  # index of the first piece each bracket covers

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if not piece[2]:
                piece[1] *= factor

    def add_text(run: str) -> None:
        for i, part in enumerate(_BREAK_RE.split(run)):
            if i:
                pieces.append([*BREAK_MARK, True])
            pieces.append([part, 1.0, False])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1: i + 2]
            if nxt and nxt in _ESCAPABLE:
                pieces.append([nxt, 1.0, False])
                i += 2
            else:  # a backslash escaping nothing is dropped, as in A1111
                i += 1
        elif c in "([":
            opened[c].append(len(pieces))
            i += 1
        elif c == ")" and opened["("]:
            scale_from(opened["("].pop(), ROUND_FACTOR)
            i += 1
        elif c == "]" and opened["["]:
            scale_from(opened["["].pop(), SQUARE_FACTOR)
            i += 1
        elif c == ":" and opened["("] and (m := _WEIGHT_RE.match(text, i)) and _is_float(m.group(1)):
            scale_from(opened["("].pop(), float(m.group(1)))
            i = m.end()
        elif c in _SPECIAL:  # stray ")" / "]", or a ":" that is not a weight
            add_text(c)
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j
    # unclosed brackets reach to the end of the prompt
    for start in opened["("]:
        scale_from(start, ROUND_FACTOR)
    for start in opened["["]:
        scale_from(start, SQUARE_FACTOR)

    return _merge_equal_weights(pieces)


def _merge_equal_weights(pieces: list[list]) -> list[tuple[str, float]]:
    """Adjacent text pieces of equal weight joined; BREAK marks kept apart."""
    merged: list[list] = []
    for piece in pieces:
        if merged and not piece[2] and not merged[-1][2] and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w, _ in merged] or [("", 1.0)]


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


class Chunk(NamedTuple):
    tokens: list[int]    # at most ``chunk_length`` token ids, no start/end tokens
    weights: list[float]
    # per token: None, or the textual-inversion vector that replaces the token's embedding row
    embeds: list | None = None


PLACEHOLDER = 0  # the id under an embedding vector: low, so argmax-pooling still finds the end token


def embedding_matcher(tokenizer, embeddings) -> dict[int, list]:
    """First token id → [(the word's ids, its vectors)], longest words first (A1111 matches an
    embedding by the token ids of its name in the prompt)."""
    table: dict[int, list] = {}
    for name, emb in (embeddings or {}).items():
        ids = tokenizer.encode(clean_text(name))
        if ids:
            table.setdefault(ids[0], []).append((ids, emb.vectors))
    for options in table.values():
        options.sort(key=lambda o: -len(o[0]))
    return table


def _expand(tokens: list[int], matcher: dict) -> list[tuple[int, object]]:
    """(id, None) per ordinary token; an embedding's word becomes (PLACEHOLDER, vector) per vector,
    the group as one tuple item ``(None, vectors)`` so it is never split across chunks."""
    out: list = []
    i = 0
    while i < len(tokens):
        for ids, vectors in matcher.get(tokens[i], ()):
            if tokens[i:i + len(ids)] == ids:
                out.append((None, vectors))
                i += len(ids)
                break
        else:
            out.append((tokens[i], None))
            i += 1
    return out


def tokenize_prompt(tokenizer, text: str, chunk_length: int = 75,
                    comma_backtrack: int = COMMA_BACKTRACK, embeddings=None) -> list[Chunk]:
    """Parse, tokenise (without special tokens) and split into chunks of ``chunk_length`` tokens.

    When a chunk fills up and its last comma lies within ``comma_backtrack`` tokens of its end, the
    tokens after that comma move to the next chunk so a phrase is not cut in two (A1111's rule).
    An empty prompt, or one that ends in BREAK, yields no trailing empty chunk unless it is the only one.
    ``embeddings`` (word → :class:`ldm.embeddings.TextualInversion`): each occurrence of a word
    becomes its vectors, kept whole in one chunk (a group that does not fit starts the next).
    """
    parsed = parse_prompt_attention(text)
    words = [t for t, w in parsed if (t, w) != BREAK_MARK]
    words = [clean_text(t) for t in words]  # as ldm.modules.tokenizer.tokenize does for plain prompts
    token_lists = iter([tokenizer.encode(w) for w in words])
    matcher = embedding_matcher(tokenizer, embeddings)
    comma = tokenizer.token_to_id(",</w>")
    chunks: list[Chunk] = []
    cur = Chunk([], [], [])
    last_comma = -1

    def push(chunk: Chunk) -> None:
        chunks.append(chunk if any(e is not None for e in chunk.embeds) else Chunk(chunk.tokens,
                                                                                   chunk.weights))

    for piece in parsed:
        if piece == BREAK_MARK:
            push(cur)
            cur, last_comma = Chunk([], [], []), -1
            continue
        weight = piece[1]
        for token, vectors in _expand(next(token_lists), matcher):
            if vectors is not None:  # an embedding: all its vectors in one chunk
                n = len(vectors)
                if n > chunk_length:
                    raise ValueError(f"an embedding of {n} vectors does not fit in a chunk of "
                                     f"{chunk_length} tokens")
                if len(cur.tokens) + n > chunk_length:
                    push(cur)
                    cur, last_comma = Chunk([], [], []), -1
                cur.tokens.extend([PLACEHOLDER] * n)
                cur.weights.extend([weight] * n)
                cur.embeds.extend(list(vectors))
                continue
            if len(cur.tokens) == chunk_length:
                keep = len(cur.tokens)
                if token != comma and last_comma >= 0 and chunk_length - last_comma <= comma_backtrack:
                    keep = last_comma + 1
                push(Chunk(cur.tokens[:keep], cur.weights[:keep], cur.embeds[:keep]))
                cur = Chunk(cur.tokens[keep:], cur.weights[keep:], cur.embeds[keep:])
                last_comma = -1
            if token == comma:
                last_comma = len(cur.tokens)
            cur.tokens.append(token)
            cur.weights.append(weight)
            cur.embeds.append(None)
    if cur.tokens or not chunks:
        push(cur)
    return chunks


def chunk_ids(chunk: Chunk, pad_id: int, length: int = 77,
              start_id: int = SOT, end_id: int = EOT) -> tuple[list[int], list[float]]:
    """Model input for one chunk: start, tokens, end, padding (``length`` ids), weights 1 around them.

    This is exactly what the standard tokenizer gives for a prompt of at most ``length - 2`` tokens
    (SD1 pads with the end token, SD2 with 0), so short prompts condition as they always did.
    """
    pad = length - 2 - len(chunk.tokens)
    if pad < 0:
        raise ValueError(f"a chunk holds at most {length - 2} tokens, got {len(chunk.tokens)}")
    ids = [start_id, *chunk.tokens, end_id] + [pad_id] * pad
    return ids, [1.0, *chunk.weights, 1.0] + [1.0] * pad


def embedding_overrides(chunks: list[Chunk], shape) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The token rows that embeddings replace in the ids of ``chunks`` (one row each, laid out by
    :func:`chunk_ids`): (mask of ``shape``, vectors in row-major order), for
    :func:`ldm.embeddings.overridden`; None when no chunk holds an embedding."""
    vectors = [(r, 1 + j, v) for r, c in enumerate(chunks) for j, v in enumerate(c.embeds or ())
               if v is not None]
    if not vectors:
        return None
    mask = torch.zeros(shape, dtype=torch.bool)
    for r, j, _ in vectors:
        mask[r, j] = True
    return mask, torch.stack([v for _, _, v in vectors])


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's embedding by its weight, then restore each row's mean (A1111's rule).

    ``z`` is (rows, tokens, width) and ``weights`` (rows, tokens). Rows whose weights are all 1 come
    back untouched, bit for bit.
    """
    out = z.clone()
    for r in range(z.shape[0]):
        w = weights[r]
        if bool((w == 1).all()):
            continue
        row = z[r].float()
        scaled = row * w.to(row.device, torch.float32)[:, None]
        new_mean = scaled.mean()
        if new_mean != 0:
            scaled = scaled * (row.mean() / new_mean)
        out[r] = scaled.to(z.dtype)
    return out


def _as_list(value, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    bad = [type(v).__name__ for v in items if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must be a string or a list of strings, got an item of type {bad[0]}")
    return items


def encode_prompts(model, prompts: list[str], negatives: list[str], clip_skip: int = 0,
                   embeddings=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning for classifier-free guidance: ``(cond, uncond)``, each (B, 77·k, width).

    Every prompt and negative prompt is padded with empty-prompt chunks to the same k, as A1111 does
    so that both halves batch into one UNet call. A single negative prompt applies to every prompt.
    ``embeddings``: textual-inversion words usable in both (see :func:`tokenize_prompt`).
    """
    prompts, negatives = _as_list(prompts, "prompts"), _as_list(negatives, "negative prompts")
    if not prompts:
        raise ValueError("no prompt given")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts")
    cfg = model.config.text
    usable = cfg.layers - cfg.skip_layers()
    if not isinstance(clip_skip, int) or not 0 <= clip_skip < usable:
        raise ValueError(f"clip_skip must be an integer from 0 to {usable - 1}, got {clip_skip!r}")

    tokenizer = tokenizer_for(cfg)
    chunked = {t: tokenize_prompt(tokenizer, t, cfg.max_length - 2, embeddings=embeddings)
               for t in dict.fromkeys(prompts + negatives)}
    k = max(len(c) for c in chunked.values())

    def encode(chunks: list[Chunk]) -> torch.Tensor:
        rows = [chunk_ids(c, cfg.pad_token_id, cfg.max_length, SOT, EOT) for c in chunks]
        ids = torch.tensor([r[0] for r in rows])
        weights = torch.tensor([r[1] for r in rows])
        overrides = embedding_overrides(chunks, ids.shape)
        if overrides is None:
            return apply_weights(model.get_learned_conditioning(ids, clip_skip), weights)
        from ldm.embeddings import overridden

        with overridden(model.cond_stage_model, *overrides):
            return apply_weights(model.get_learned_conditioning(ids, clip_skip), weights)

    with torch.no_grad():
        # each distinct prompt is encoded once, on its own, so a prompt conditions the same whatever
        # else is in the batch (A1111 shares the weight rescaling across a batch; we keep it per prompt)
        empty = encode([Chunk([], [])]) if any(len(c) < k for c in chunked.values()) else None
        encoded = {}
        for text, chunks in chunked.items():
            z = encode(chunks)
            if len(chunks) < k:
                z = torch.cat([z, empty.expand(k - len(chunks), -1, -1)])
            encoded[text] = z.reshape(1, -1, z.shape[-1])
    cond = torch.cat([encoded[t] for t in prompts])
    uncond = torch.cat([encoded[t] for t in negatives])
    return cond, uncond
