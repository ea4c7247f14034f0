"""Textual-inversion embeddings: the file layouts, the prompt word, and parity with diffusers'
``load_textual_inversion`` (same token vectors, same text-encoder output) on identical weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldm.embeddings import load_embedding, save_embedding
from ldm.weights_io import CheckpointError
from pipelines.pipeline import Pipeline
from pipelines.prompts import encode_prompts, tokenize_prompt
from ldm.modules.tokenizer import tokenizer_for
from reference import pipelines as dp
from reference.tiny import tiny_tree

pytestmark = pytest.mark.usefixtures("single_thread")

WIDTH = 32  # the tiny models' text width


def _vectors(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def side(request):
    model = dp.random_model(request.param)
    return request.param, model, dp.components(model, tiny_tree(request.param))


def _files(folder, n_multi: int = 3):
    """The same kind of embedding in each layout people have: name → (path, vectors)."""
    out = {}
    v = _vectors(n_multi, 1)
    save_embedding(folder / "xqmulti.pt", "xqmulti", v)  # A1111 .pt
    out["xqmulti"] = (folder / "xqmulti.pt", v)
    v = _vectors(2, 2)
    save_embedding(folder / "xqstyle.safetensors", "xqstyle", v)  # A1111 .safetensors
    out["xqstyle"] = (folder / "xqstyle.safetensors", v)
    v = _vectors(1, 3)
    save_file({"<toy>": v[0]}, folder / "xqtoy.safetensors")  # diffusers learned_embeds
    out["xqtoy"] = (folder / "xqtoy.safetensors", v)
    return out


def test_encoder_output_matches_diffusers_load_textual_inversion(side, tmp_path):
    kind, model, parts = side
    files = _files(tmp_path)
    pipe = dp.pipeline("txt2img", dict(parts), dp.reference_scheduler("ddim"))
    ours = {}
    for word, (path, vectors) in files.items():
        pipe.load_textual_inversion(str(path), token=word)
        emb = load_embedding(path, WIDTH)
        assert torch.equal(emb.vectors, vectors)
        ours[word] = emb
    prompt = "a xqmulti cat, xqstyle, on a xqtoy table"
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        cond, _ = encode_prompts(model, [prompt], [""], embeddings=ours)
        plain, _ = encode_prompts(model, [prompt], [""])
    torch.testing.assert_close(cond, theirs, atol=1e-5, rtol=1e-5)
    assert (cond - plain).abs().max() > 1e-2  # the words did change the conditioning


def test_negative_prompt_and_weights_take_embeddings(side, tmp_path):
    _, model, _ = side
    emb = {"xqmulti": load_embedding(_files(tmp_path)["xqmulti"][0], WIDTH)}
    with torch.no_grad():
        _, neg = encode_prompts(model, ["a cat"], ["xqmulti"], embeddings=emb)
        _, neg_plain = encode_prompts(model, ["a cat"], ["xqmulti"])
        weighted, _ = encode_prompts(model, ["a (xqmulti:1.4) cat"], [""], embeddings=emb)
        unweighted, _ = encode_prompts(model, ["a xqmulti cat"], [""], embeddings=emb)
    assert (neg - neg_plain).abs().max() > 1e-2
    assert (weighted - unweighted).abs().max() > 1e-3


def test_an_embedding_is_never_split_across_chunks(tmp_path):
    model = dp.random_model("sd1")
    tok = tokenizer_for(model.config.text)
    emb = {"xqmulti": load_embedding(_files(tmp_path, n_multi=4)["xqmulti"][0], WIDTH)}
    filler = " ".join(["a"] * 73)  # 73 tokens: 2 places left in the first chunk, 4 needed
    chunks = tokenize_prompt(tok, f"{filler} xqmulti end", embeddings=emb)
    assert len(chunks[0].tokens) == 73 and chunks[0].embeds is None
    assert sum(e is not None for e in chunks[1].embeds) == 4
    assert torch.equal(torch.stack(chunks[1].embeds[:4]), emb["xqmulti"].vectors)


def test_bad_files_are_refused_by_name(tmp_path):
    save_file({"emb_params": torch.zeros(2, 64)}, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match="'wide'.*64 wide.*32 wide"):
        load_embedding(tmp_path / "wide.safetensors", WIDTH)
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="SDXL embedding"):
        load_embedding(tmp_path / "xl.safetensors", WIDTH)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_embedding(tmp_path / "junk.pt", WIDTH)
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="one token tensor"):
        load_embedding(tmp_path / "two.pt", WIDTH)


def test_pipeline_finds_embeddings_beside_the_checkpoint_and_records_them(tmp_path):
    from ldm.checkpoint import save_checkpoint
    from ldm.weights_io import file_hash

    model = dp.random_model("sd1")
    save_checkpoint(model, tmp_path / "tiny.safetensors")
    (tmp_path / "embeddings").mkdir()
    files = _files(tmp_path / "embeddings")
    import yaml

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_tree("sd1")))
    pipe = Pipeline.from_checkpoint(tmp_path / "tiny.safetensors", device="cpu")
    kw = dict(num_inference_steps=2, seed=1, height=32, width=32, progress=False, output_type="latent")
    with_word = pipe.txt2img("a xqstyle cat", **kw)
    plain = pipe.txt2img("a xqstyled cat", **kw)  # the word must be whole to count
    assert list(pipe.embeddings) == ["xqstyle"]  # loaded on first use only
    assert not torch.equal(with_word.latents, plain.latents)
    record = with_word.parameters[0]["TI hashes"]
    assert record == f"xqstyle: {file_hash(files['xqstyle'][0])[:12]}"
    assert "TI hashes" not in plain.parameters[0]
    # an explicit word for a file, and the negative prompt
    word = pipe.load_embedding(files["xqtoy"][0], name="toy")
    result = pipe.txt2img("a cat", negative_prompt="toy", **kw)
    assert word == "toy" and result.parameters[0]["TI hashes"].startswith("toy: ")
