"""DiffSegPipeline on a tiny SD-shaped model: consistency with the post-processing, semantic labels, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffuseg.backbones.presets import tiny_sd_backbone
from diffuseg.cli import app
from diffuseg.io import read_label, write_image
from diffuseg.methods import load_pipeline
from diffuseg.methods.diffseg import segment_attention
from diffuseg.methods.diffseg_pipeline import (
    DiffSegConfig,
    DiffSegPipeline,
    class_prompt,
    class_prompts,
    label_segments_by_cross_attention,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    model = tiny_sd_backbone(d)
    # sharpen the random UNet's attention so segments are not trivially merged
    for name, p in model.unet.named_parameters():
        if name.endswith(("to_q.weight", "to_k.weight")):
            p.data.mul_(8.0)
    model.save_pretrained(d / "model")
    return model, d / "model"


def _image(seed: int = 0, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    img[:, : size // 2] = (200, 30, 30)
    img[size // 3 :, size // 2 :] = (20, 40, 220)
    return np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)


def test_pipeline_equals_postprocessing_of_captured_maps(tiny):
    model, _ = tiny
    cfg = DiffSegConfig.for_backbone(model, kl_threshold=[0.3] * 3, threshold_mode="relative", output_size=32)
    pipe = DiffSegPipeline(model, cfg)
    images = [_image(0), _image(1)]
    out = pipe(images)
    maps, _ = pipe.attention(images, cfg.timestep)
    direct = segment_attention(
        {s: m[:, None] for s, m in maps.items()},
        kl_threshold=[0.3] * 3,
        num_points=16,
        output_size=32,
        threshold_mode="relative",
    )
    assert out.labels.shape == (2, 32, 32) and out.labels.dtype == np.int64
    for a, b in zip(out.labels, direct, strict=True):  # same partition, ids compacted
        pairs = {(int(x), int(y)) for x, y in zip(a.ravel(), b.ravel(), strict=True)}
        assert len(pairs) == len(np.unique(a)) == len(np.unique(b))
    assert out.extras["num_segments"] == [len(np.unique(x)) for x in out.labels]


def test_defaults_come_from_backbone_config(tiny):
    model, _ = tiny
    assert DiffSegConfig.for_backbone(model).kl_threshold == [1.1, 1.1, 1.1]  # SD defaults
    model.config.method_defaults["diffseg"] = {"kl_threshold": [0.1] * 3, "threshold_mode": "relative"}
    try:
        cfg = DiffSegConfig.for_backbone(model, num_points=8)
        assert cfg.threshold_mode == "relative" and cfg.num_points == 8 and cfg.kl_threshold == [0.1] * 3
    finally:
        model.config.method_defaults.clear()


def test_check_inputs_errors(tiny):
    model, _ = tiny
    pipe = DiffSegPipeline(model)
    with pytest.raises(ValueError, match="uint8"):
        pipe(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="timestep"):
        pipe(_image(), timestep=5000)
    with pytest.raises(ValueError, match="list"):
        pipe(_image(), kl_threshold=1.1)
    with pytest.raises(ValueError, match="duplicate"):
        pipe(_image(), class_names=["bag", "bag"])


def test_kmeans_baseline_through_pipeline(tiny):
    model, _ = tiny
    pipe = DiffSegPipeline(model, DiffSegConfig.for_backbone(model, output_size=32))
    out = pipe([_image(0), _image(1)], num_clusters=[2, 3], generator=torch.Generator().manual_seed(0))
    assert [len(np.unique(x)) for x in out.labels] == [2, 3]


def test_cross_attention_labelling_picks_the_attending_class():
    segments = np.zeros((1, 8, 8), np.int64)
    segments[0, :, 4:] = 1
    cross = torch.full((1, 16, 6), 0.01)  # side 4: 16 queries, 6 tokens
    grid = torch.arange(16).view(4, 4)
    right = (grid % 4 >= 2).flatten()
    cross[0, ~right, 2] = 0.9  # token 2 ("bag") attends to the left half
    cross[0, right, 4] = 0.5  # tokens 4-5 ("ankle boot") to the right half
    cross[0, right, 5] = 0.7
    labels, scores = label_segments_by_cross_attention(segments, {4: cross}, [[2], [4, 5]])
    assert (labels[0, :, :4] == 0).all() and (labels[0, :, 4:] == 1).all()
    assert scores.shape == (1, 2, 8, 8) and np.isclose(scores.max(), 1.0)


def test_semantic_output_and_prompt(tiny):
    model, _ = tiny
    assert class_prompt(["background", "bag", "ankle boot"]) == "a background, a bag and a ankle boot"
    pipe = DiffSegPipeline(model, DiffSegConfig.for_backbone(model, output_size=32))
    out = pipe(_image(), class_names="background, bag, ankle boot")
    assert out.class_names == ["background", "bag", "ankle boot"]
    assert out.labels.max() < 3 and out.scores.shape == (1, 3, 32, 32)
    assert "segments" in out.extras


def test_cli_segment_and_evaluate(tiny, tmp_path):
    _, model_dir = tiny
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    write_image(imgs / "a.png", _image(0))
    write_image(imgs / "b.png", _image(1))
    (imgs / "broken.png").write_bytes(b"not a png")
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "segment",
            str(imgs),
            "--method",
            "diffseg",
            "--backbone",
            str(model_dir),
            "--out",
            str(tmp_path / "out"),
            "--kl-threshold",
            "0.3,0.3,0.3",
            "--threshold-mode",
            "relative",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "wrote 2 label maps" in res.output
    lab = read_label(tmp_path / "out" / "a.png")
    assert lab.shape == (512, 512)  # SD default output size for a CLIP-conditioned backbone
    assert (tmp_path / "out" / "b_overlay.png").is_file()
    assert not (tmp_path / "out" / "broken.png").exists()

    # a two-image dataset in the DESIGN.md layout
    data = tmp_path / "data"
    for sub in ("img_dir/val", "ann_dir/val"):
        (data / sub).mkdir(parents=True)
    from diffuseg.io import write_label

    for i in range(2):
        write_image(data / "img_dir/val" / f"{i}.png", _image(i, 64))
        gt = np.zeros((64, 64), np.uint8)
        gt[:, 32:] = 1
        write_label(data / "ann_dir/val" / f"{i}.png", gt)
    (data / "meta.json").write_text(
        json.dumps(
            {
                "name": "toy",
                "classes": ["background", "bag"],
                "unseen": [],
                "ignore_index": 255,
                "palette": [[0, 0, 0], [255, 0, 0]],
            }
        )
    )
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--method",
            "diffseg",
            "--backbone",
            str(model_dir),
            "--data",
            str(data),
            "--json",
            str(tmp_path / "r.json"),
            "--matching",
            "dataset",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "diffseg" and report["num_images"] == 2
    assert report["protocol"]["matching"] == "dataset"
    assert 0 <= report["metrics"]["mIoU"] <= 100


def test_load_pipeline_registry_errors():
    with pytest.raises(ValueError, match="unknown method"):
        load_pipeline("nope")


def test_class_names_overflowing_one_prompt_are_split_across_prompts(tiny):
    def tokenize(prompts, max_length=8):  # word-level tokenizer that truncates like the real ones
        out = []
        for p in prompts:
            words = p.replace(",", " ,").split()[: max_length - 2]
            out.append(["[CLS]", *words, "[SEP]"] + ["[PAD]"] * (max_length - 2 - len(words)))
        return out

    names = ["bag", "ankle boot", "coat", "sandal", "t-shirt"]
    prompts = class_prompts(names, tokenize)
    assert [p for p, _ in prompts] == ["a bag and a ankle boot", "a coat and a sandal", "a t-shirt"]
    assert [[tokenize([p])[0][i] for i in pos] for p, ps in prompts for pos in ps] == [
        ["bag"], ["ankle", "boot"], ["coat"], ["sandal"], ["t-shirt"]
    ]  # fmt: skip
    with pytest.raises(ValueError, match="does not fit in one prompt"):
        class_prompts(["a very long class name indeed"], tokenize)

    # the pipeline: each class's score map is what its own prompt alone gives
    model, _ = tiny
    pipe = DiffSegPipeline(model, DiffSegConfig.for_backbone(model, output_size=32))
    conditioner = model.text_conditioner
    full = conditioner.max_length
    try:
        conditioner.max_length = 24  # the tiny CLIP vocabulary is per letter: a few names per prompt
        many = ["background", "bag", "ankle boot", "coat", "sandal", "sneaker", "dress"]
        assert len(class_prompts(many, model.tokenize)) > 1
        out = pipe(_image(), class_names=many)
        first = class_prompts(many, model.tokenize)[0][1]
        alone = pipe(_image(), class_names=many[: len(first)])
    finally:
        conditioner.max_length = full
    assert out.class_names == many and out.scores.shape == (1, len(many), 32, 32)
    assert np.allclose(out.scores[:, : len(first)], alone.scores, atol=1e-6)
    assert out.labels.max() < len(many)
