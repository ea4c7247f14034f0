"""The concept word's vectors, shared by the textual-inversion trainer and pivotal tuning: the
rows they start from, the captions that hold the word, and the token inputs that put the learned
rows at the word's positions."""
from __future__ import annotations

import torch

from .engine import TrainingError

NAME_PLACEHOLDER = "[name]"  # A1111's template word for the embedding's name


def _row_numbers(token: str, n: int):
    """A stand-in embedding whose i-th "vector" is the number i: tokenised with it, a caption's
    chunks say which learned row sits at each of the word's positions."""
    from ldm.embeddings import TextualInversion

    return {token: TextualInversion(token, torch.arange(n, dtype=torch.float32)[:, None])}


def contains_word(tokenizer, caption: str, token: str) -> bool:
    """Whether ``caption`` holds ``token`` as the prompt code would find it (by its token ids)."""
    from pipelines.prompts import tokenize_prompt

    chunks = tokenize_prompt(tokenizer, caption, embeddings=_row_numbers(token, 1))
    return any(c.embeds for c in chunks)


def with_word(tokenizer, caption: str, token: str) -> str:
    """The caption trained on: ``[name]`` → the word; prefixed by ``"word, "`` if it lacks it."""
    caption = caption.replace(NAME_PLACEHOLDER, token).strip()
    if contains_word(tokenizer, caption, token):
        return caption
    return f"{token}, {caption}" if caption else token


def init_vectors(text_encoder, tokenizer, init_word: str, n: int) -> torch.Tensor:
    """(n, width) float32: the init word's first n token rows, row i = token i·T // n (A1111)."""
    from ldm.embeddings import token_embedding
    from ldm.modules.tokenizer import clean_text

    ids = tokenizer.encode(clean_text(init_word))[:n]
    if not ids:
        raise TrainingError(f"--init-word {init_word!r} has no tokens")
    rows = token_embedding(text_encoder).weight.detach().float().cpu()[ids]
    return torch.stack([rows[i * len(ids) // n] for i in range(n)]).clone()


def check_token(tokenizer, token: str, note=print) -> None:
    """A word that is one vocabulary entry still works (it is matched by its id), but the learned
    vectors then replace that word everywhere it is used: say so."""
    from ldm.modules.tokenizer import clean_text

    ids = tokenizer.encode(clean_text(token))
    if not ids:
        raise TrainingError(f"--token {token!r} has no tokens")
    if len(ids) == 1:
        note(f"warning: --token {token!r} is a single word of the tokenizer's vocabulary; the "
             "embedding will replace that word wherever a prompt uses it")


def token_inputs(cfg, tokenizer, words: dict, captions: list[str]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, rows) of the captions, each padded with empty chunks to the longest, as
    :func:`pipelines.prompts.encode_prompts` pads prompts (emphasis weights are not applied);
    ``words`` from :func:`_row_numbers`: ``mask`` marks the word's positions, ``rows`` the learned
    row at each of them in row-major order."""
    from ldm.modules.tokenizer import EOT, SOT
    from pipelines.prompts import Chunk, chunk_ids, tokenize_prompt

    chunked = [tokenize_prompt(tokenizer, c, cfg.max_length - 2, embeddings=words) for c in captions]
    k = max(len(c) for c in chunked)
    rows_ids, positions, rows = [], [], []
    for chunks in chunked:
        for chunk in chunks + [Chunk([], [])] * (k - len(chunks)):
            for j, e in enumerate(chunk.embeds or ()):
                if e is not None:
                    positions.append((len(rows_ids), 1 + j))
                    rows.append(int(e[0]))
            rows_ids.append(chunk_ids(chunk, cfg.pad_token_id, cfg.max_length, SOT, EOT)[0])
    ids = torch.tensor(rows_ids)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for r, j in positions:
        mask[r, j] = True
    return ids, mask, torch.tensor(rows, dtype=torch.long)
