"""Seg-diffusion on a tiny SD-shaped model: Marigold protocol, open-vocabulary combination, training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffuseg.backbones.presets import tiny_sd_backbone
from diffuseg.cli import app
from diffuseg.eval.runner import load_meta
from diffuseg.io import read_label
from diffuseg.methods.seg_diffusion import (
    SegDiffusionConfig,
    SegDiffusionPipeline,
    combine_classes,
    ensemble_masks,
    split_background,
)
from diffuseg.train.seg_diffusion import (
    SegDiffusionSettings,
    SegDiffusionTask,
    build_cache,
    configure_scheduler,
    multires_noise,
    render_mask,
    sample_prompts,
    widen_conv_in,
    write_model_card,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "fashion_scenes"
NAMES = ["background", "bag", "sandal"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: the tiny models gain nothing from more, and a shared CPU makes them stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A widened tiny SD backbone saved to a folder, as a fine-tuned SD 2 checkpoint would be."""
    d = tmp_path_factory.mktemp("tiny_seg")
    torch.manual_seed(0)
    bb = tiny_sd_backbone(d)
    bb.save_pretrained(d / "base")
    widen_conv_in(bb.unet)
    bb.scheduler = configure_scheduler(bb.scheduler)
    bb.config.method_defaults["seg-diffusion"] = {"ensemble_size": 3, "denoise_steps": 2}
    bb.save_pretrained(d / "seg")
    return SegDiffusionPipeline.from_pretrained(str(d / "seg")), d


def _image(seed: int = 0, h: int = 48, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- pure parts
def test_widen_conv_in_keeps_the_pretrained_function(tmp_path):
    torch.manual_seed(0)
    bb = tiny_sd_backbone(tmp_path)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    text = torch.randn(2, 77, 32)
    with torch.no_grad():
        before = bb.unet(x, t, encoder_hidden_states=text).sample
        widen_conv_in(bb.unet)
        after = bb.unet(torch.cat([x, x], 1), t, encoder_hidden_states=text).sample
    assert bb.unet.config.in_channels == 8 and bb.unet.conv_in.weight.shape[1] == 8
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    weight = bb.unet.conv_in.weight.clone()
    widen_conv_in(bb.unet)  # idempotent
    assert torch.equal(bb.unet.conv_in.weight, weight)
    with pytest.raises(ValueError, match="multiple"):
        widen_conv_in(bb.unet, in_channels=12)


def test_ensemble_masks_median_mad_and_mean_std():
    m = torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1).expand(3, 2, 2)
    pred, unc = ensemble_masks(m, "median")
    torch.testing.assert_close(pred, torch.full((2, 2), 0.5))
    torch.testing.assert_close(unc, torch.full((2, 2), 0.4))
    pred, unc = ensemble_masks(m, "mean")
    torch.testing.assert_close(pred, torch.full((2, 2), 0.5))
    torch.testing.assert_close(unc, torch.full((2, 2), 0.4))  # sample std of 0.1, 0.5, 0.9
    assert ensemble_masks(m[:1], "median")[1] is None
    with pytest.raises(ValueError, match="reduction"):
        ensemble_masks(m, "max")


def test_split_background_never_prompts_it():
    assert split_background(["bag", "sandal"]) == (
        ["background", "bag", "sandal"],
        ["bag", "sandal"],
        0,
        [1, 2],
    )
    out, prompted, bg, idx = split_background(["bag", "Background", "sandal"])
    assert (
        out == ["bag", "Background", "sandal"] and prompted == ["bag", "sandal"] and bg == 1 and idx == [0, 2]
    )
    with pytest.raises(ValueError, match="besides"):
        split_background(["background"])
    with pytest.raises(ValueError, match="more than once"):
        split_background(["background", "bag", "BACKGROUND"])


def test_combine_classes_argmax_with_background_threshold():
    probs = torch.tensor([[[[0.9, 0.2, 0.6]]], [[[0.1, 0.3, 0.7]]]]).permute(1, 0, 2, 3)  # (1, 2, 1, 3)
    labels, scores = combine_classes(probs, 0.5, background_index=0, prompted_index=[1, 2], num_out=3)
    assert labels.tolist() == [[[1, 0, 2]]]
    assert scores.shape == (1, 3, 1, 3) and torch.all(scores[:, 0] == 0.5)
    assert torch.equal(scores.argmax(1), labels)
    labels, _ = combine_classes(probs, 0.95, 0, [1, 2], 3)
    assert labels.tolist() == [[[0, 0, 0]]]


def test_sample_prompts_swaps_in_absent_classes_only():
    g = torch.Generator().manual_seed(0)
    absent = torch.tensor(
        [[False, True, True, False], [False, False, False, False], [True, False, False, True]]
    )
    cls = torch.tensor([0, 2, 1])
    new, neg = sample_prompts(cls, absent, 1.0, g)
    assert neg.tolist() == [True, False, True]  # row 1 has no absent class: stays positive
    assert absent[0, new[0]] and absent[2, new[2]] and new[1] == 2
    same, none = sample_prompts(cls, absent, 0.0, g)
    assert torch.equal(same, cls) and not none.any()


def test_multires_noise_is_unit_scale_and_reproducible():
    a = multires_noise((4, 4, 16, 16), torch.tensor([0.0, 0.3, 0.6, 0.9]), torch.Generator().manual_seed(1))
    b = multires_noise((4, 4, 16, 16), torch.tensor([0.0, 0.3, 0.6, 0.9]), torch.Generator().manual_seed(1))
    assert a.shape == (4, 4, 16, 16) and torch.equal(a, b)
    assert abs(float(a.std()) - 1.0) < 1e-4
    # strong pyramid noise is spatially smoother than i.i.d. noise: neighbours correlate
    strong = multires_noise((8, 4, 16, 16), 0.9, torch.Generator().manual_seed(2))
    corr = torch.corrcoef(torch.stack([strong[..., :-1].flatten(), strong[..., 1:].flatten()]))[0, 1]
    assert corr > 0.2


def test_render_mask():
    label = np.array([[0, 3], [3, 255]])
    m = render_mask(label, 3)
    assert m.dtype == np.uint8 and m.shape == (2, 2, 3)
    assert m[..., 0].tolist() == [[0, 255], [255, 0]]


def test_config_validation_says_what_is_wrong():
    with pytest.raises(ValueError, match="ensemble_size"):
        SegDiffusionConfig(ensemble_size=0)
    with pytest.raises(ValueError, match="ensemble_reduction"):
        SegDiffusionConfig(ensemble_reduction="max")
    with pytest.raises(ValueError, match="prompt_template"):
        SegDiffusionConfig(prompt_template="a bag")
    with pytest.raises(ValueError, match="unknown Seg-diffusion settings"):
        SegDiffusionConfig.from_dict({"ensemble": 3})
    with pytest.raises(ValueError, match="zero_snr"):
        SegDiffusionSettings(prediction_type="epsilon", zero_snr=True)


# ----------------------------------------------------------------------------- pipeline
def test_pipeline_output_contract(tiny, monkeypatch):
    pipe, _ = tiny
    assert pipe.config.ensemble_size == 3  # the checkpoint's method_defaults
    calls = []
    encode = pipe.backbone.encode_text
    monkeypatch.setattr(pipe.backbone, "encode_text", lambda p: calls.append(list(p)) or encode(p))
    out = pipe([_image(0), _image(1)], class_names="bag, sandal")
    monkeypatch.undo()
    assert calls == [["a bag", "a sandal"]]  # one prompt per class, not per character
    assert out.class_names == NAMES
    assert out.labels.shape == (2, 48, 48) and out.labels.dtype == np.int64
    assert out.scores.shape == (2, 3, 48, 48) and out.uncertainty.shape == (2, 48, 48)
    assert set(np.unique(out.labels)) <= {0, 1, 2}
    assert np.all((out.scores >= 0) & (out.scores <= 1)) and np.all(out.uncertainty >= 0)
    assert out.extras["class_uncertainty"].shape == (2, 2, 48, 48)
    # the uncertainty is that of the best prompted class
    best = out.scores[:, 1:].argmax(1)
    np.testing.assert_allclose(
        out.uncertainty, np.take_along_axis(out.extras["class_uncertainty"], best[:, None], 1)[:, 0]
    )


def test_results_do_not_depend_on_batching_or_companions(tiny):
    pipe, _ = tiny
    a, b = _image(0), _image(1, 40, 56)
    auto = pipe([a, b], class_names=NAMES, output_size=(32, 32))
    one = pipe([a, b], class_names=NAMES, output_size=(32, 32), batch_size=1)
    np.testing.assert_allclose(one.scores, auto.scores, atol=1e-5)
    alone = pipe([a], class_names=NAMES, output_size=(32, 32))  # a draws the same noise first
    np.testing.assert_allclose(alone.scores[0], auto.scores[0], atol=1e-5)


def test_seed_and_generator(tiny):
    pipe, _ = tiny
    img = _image(2)
    s0 = pipe(img, class_names=NAMES, seed=0).scores
    np.testing.assert_array_equal(pipe(img, class_names=NAMES, seed=0).scores, s0)
    assert not np.allclose(pipe(img, class_names=NAMES, seed=1).scores, s0)
    g = torch.Generator().manual_seed(0)
    np.testing.assert_array_equal(pipe(img, class_names=NAMES, seed=5, generator=g).scores, s0)


def test_sizes_native_processing_and_output(tiny):
    pipe, _ = tiny
    img = _image(3, 40, 56)
    assert pipe(img, class_names=NAMES, processing_res=0).labels.shape == (1, 40, 56)
    assert pipe(img, class_names=NAMES, output_processing_res=True).labels.shape == (1, 91, 128)
    assert pipe(img, class_names=NAMES, output_size=28).labels.shape == (1, 20, 28)
    assert pipe(img, class_names=NAMES, output_size=(10, 12)).labels.shape == (1, 10, 12)
    one = pipe(img, class_names=NAMES, ensemble_size=1, ensemble_reduction="mean")
    assert one.uncertainty is None and one.labels.shape == (1, 40, 56)


def test_input_errors_are_actionable(tiny):
    pipe, d = tiny
    with pytest.raises(ValueError, match="different sizes"):
        pipe([_image(0), _image(1, 40, 56)], class_names=NAMES)
    with pytest.raises(ValueError, match="besides 'background'"):
        pipe(_image(0), class_names=["background"])
    with pytest.raises(ValueError, match="no default classes"):
        pipe(_image(0))
    with pytest.raises(ValueError, match="denoise_steps"):
        pipe(_image(0), class_names=NAMES, denoise_steps=0)
    with pytest.raises(ValueError, match="processing_res"):
        pipe(_image(0), class_names=NAMES, processing_res=32)
    with pytest.raises(ValueError, match="uint8"):
        pipe(np.zeros((16, 16, 3), np.float32), class_names=NAMES)
    with pytest.raises(ValueError, match="train seg-diffusion"):
        SegDiffusionPipeline.from_pretrained(str(d / "base"))


def test_half_precision_runs_in_16_bits(tiny):
    pipe, d = tiny
    half = SegDiffusionPipeline.from_pretrained(str(d / "seg"), half_precision=True)
    assert half.backbone.unet.dtype == torch.bfloat16 and half.backbone.vae.dtype == torch.bfloat16
    img = _image(4)
    out = half(img, class_names=NAMES)
    ref = pipe(img, class_names=NAMES)
    assert out.scores.dtype == np.float32
    assert np.abs(out.scores - ref.scores).mean() < 0.05  # same model, rounded weights


# ----------------------------------------------------------------------------- training
def _expected_pairs(unseen: list[str], min_pixels: int) -> list[tuple[str, str]]:
    meta = load_meta(EXAMPLES)
    classes = meta["classes"]
    pairs = []
    for path in sorted((EXAMPLES / "ann_dir" / "train").glob("*.png")):
        label = read_label(path)
        present = {classes[c] for c in np.unique(label) if c < len(classes)}
        if present & set(unseen):
            continue
        pairs += [
            (path.stem, classes[c])
            for c in range(1, len(classes))
            if classes[c] not in unseen and (label == c).sum() >= min_pixels
        ]
    return pairs


def test_cache_pairs_and_prompts_leave_unseen_classes_out(tiny, tmp_path, monkeypatch):
    _, d = tiny
    from diffuseg.backbones.latent import LatentDiffusionBackbone

    bb = LatentDiffusionBackbone.from_pretrained(str(d / "base"))
    settings = SegDiffusionSettings(min_pixels=4, num_val=0, card_samples=0)
    unseen = ["sandal", "coat"]
    cache = build_cache(bb, EXAMPLES, tmp_path / "cache", settings, unseen, progress=False)
    record = json.loads((cache / "done.json").read_text())
    pairs = np.load(cache / "pairs.npy")
    got = [(record["ids"][r], record["key"]["seen"][s]) for r, s, _ in pairs]
    assert got == _expected_pairs(unseen, 4) and len(got) > 0
    # a cached mask latent is the VAE encoding of that class's rendered mask
    r, _, cid = pairs[0]
    label = read_label(EXAMPLES / "ann_dir" / "train" / f"{record['ids'][r]}.png")
    ref = bb.encode_image([render_mask(label, int(cid))])[0].numpy()
    np.testing.assert_allclose(np.load(cache / "mask_latents.npy")[0], ref, atol=2e-2)
    # unseen names are never encoded
    seen_prompts = []
    forward = bb.text_conditioner.forward
    monkeypatch.setattr(bb.text_conditioner, "forward", lambda p: seen_prompts.extend(p) or forward(p))
    SegDiffusionTask(bb, cache, settings)
    monkeypatch.undo()
    assert seen_prompts and not any(u in p for p in seen_prompts for u in unseen)
    # same settings: reused; other settings: rebuilt
    stamp = (cache / "done.json").stat().st_mtime_ns
    build_cache(bb, EXAMPLES, cache, settings, unseen, progress=False)
    assert (cache / "done.json").stat().st_mtime_ns == stamp
    build_cache(bb, EXAMPLES, cache, SegDiffusionSettings(min_pixels=400), unseen, progress=False)
    assert json.loads((cache / "done.json").read_text())["num_pairs"] == len(_expected_pairs(unseen, 400))


def test_train_cli_exports_a_loadable_checkpoint_with_card(tiny, tmp_path):
    _, d = tiny
    out = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "seg-diffusion.yaml"
    sets = [
        "train.max_steps=3",
        "train.batch_size=2",
        "train.eval_every=3",
        "train.checkpoint_every=3",
        "train.log_every=1",
        "data.min_pixels=4",
        "model.num_val=2",
        "model.card_samples=1",
        "pipeline.ensemble_size=2",
    ]
    args = [
        "train",
        "seg-diffusion",
        "--data",
        str(EXAMPLES),
        "--backbone",
        str(d / "base"),
        "--out",
        str(out),
    ]
    args += ["--config", str(config), "-q"] + [x for s in sets for x in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "finished=True" in result.output
    final = out / "final"
    pipe = SegDiffusionPipeline.from_pretrained(str(final))
    assert pipe.backbone.unet.config.in_channels == 8
    sched = pipe.backbone.scheduler.config
    assert sched.prediction_type == "v_prediction" and sched.rescale_betas_zero_snr
    assert pipe.config.ensemble_size == 2 and pipe.config.denoise_steps == 2
    assert pipe.unseen_classes == ["sandal", "coat"] and "sandal" not in pipe.seen_classes
    assert pipe.config.class_names == load_meta(EXAMPLES)["classes"]
    out_seg = pipe(_image(5, 64, 64))  # default vocabulary: the dataset's classes
    assert out_seg.class_names[0] == "background" and out_seg.labels.shape == (1, 64, 64)
    card = (final / "README.md").read_text()
    assert (
        "diffuseg train seg-diffusion" in card and "sandal, coat" in card and (final / "sample.png").is_file()
    )
    assert '"val"' not in card and "| hIoU |" in card
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and "val_hIoU" in r for r in log)
    # benchmarks rewrite the card with full-evaluation metrics
    write_model_card(final, metrics={"mIoU": 12.5}, metrics_note="full val")
    assert "| mIoU | 12.50 |" in (final / "README.md").read_text()
    # shipping: fp16 weights, the sample and a card that names the shipped folder (replaced atomically)
    spec = importlib.util.spec_from_file_location("ship_seg", REPO / "scripts" / "ship_seg_diffusion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shipped = tmp_path / "checkpoints" / "seg-diffusion"
    shipped.mkdir(parents=True)
    (shipped / "stale.txt").write_text("old")
    mod.main(["--export", str(final), "--out", str(shipped)])
    assert not (shipped / "stale.txt").exists() and (shipped / "sample.png").is_file()
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["seg-diffusion"]  # no temp folders left
    from safetensors import safe_open

    with safe_open(str(next((shipped / "unet").glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    card = (shipped / "README.md").read_text()
    assert f'from_pretrained("{shipped}")' in card and "diffuseg train seg-diffusion" in card
    assert "## Training history" in card and "| train | 0 → " in card  # kept without the run folder
    again = SegDiffusionPipeline.from_pretrained(str(shipped))
    assert again.config.ensemble_size == 2 and again.unseen_classes == ["sandal", "coat"]


def test_train_cli_reports_bad_input(tmp_path):
    result = CliRunner().invoke(
        app,
        ["train", "seg-diffusion", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--config", "nope"],
    )
    assert result.exit_code == 2 and "no such config" in result.output
