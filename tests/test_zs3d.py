"""ZS3D: RS(N) schedule, sampler maths, guided sampling, classifier, pipeline, training, augmentation.

Everything runs on tiny models built in code and a synthetic 16-px dataset written to tmp_path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from typer.testing import CliRunner

from diffuseg.io import read_label, write_image, write_json, write_label
from diffuseg.methods.zs3d import (
    SemanticProjection,
    Step,
    ZS3DConfig,
    ZS3DPipeline,
    augment_dataset,
    build_scheduler,
    build_unet,
    calibrate_scores,
    class_scores,
    ddim_step,
    ddpm_step,
    evaluate_zs3d,
    guidance_threshold,
    guided_sample,
    pseudo_unseen_classes,
    q_sample,
    renoise,
    sampling_plan,
    sweep_margin,
    to_epsilon,
)
from diffuseg.train.zs3d import (
    SplitArrays,
    ZS3DTask,
    load_split_arrays,
    select_training_images,
)

CLASSES = ["background", "red square", "blue square", "green square", "yellow square"]
COLOURS = {1: (220, 30, 30), 2: (30, 30, 220), 3: (30, 200, 30), 4: (230, 220, 20)}


class FakeEncoder:
    """A deterministic stand-in for MiniLM: one fixed random unit vector per name (no weights to load)."""

    dim = 16

    def encode_classes(self, names, templates=None):
        vecs = []
        for n in names:
            g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(n)))
            vecs.append(torch.randn(self.dim, generator=g))
        return torch.nn.functional.normalize(torch.stack(vecs), dim=1)


def tiny_pipeline(
    model_type: str = "ddpm", k: int = 3, size: int = 16, seed: int = 0, decoupled: bool = False
) -> ZS3DPipeline:
    torch.manual_seed(seed)
    enc = FakeEncoder()
    proj = SemanticProjection.fit(enc.encode_classes(CLASSES), CLASSES, k, text_encoder="fake")
    ch_in, ch_out = (3 + k, 3 + k) if model_type == "ddpm" else (3, k)
    unet = build_unet(
        size, ch_in, ch_out, (8, 16), 1, (), attention_head_dim=8, norm_num_groups=4, image_timestep=decoupled
    )
    cfg = ZS3DConfig(
        classes=list(CLASSES),
        unseen=["green square"],
        model_type=model_type,
        image_size=size,
        semantic_channels=k,
        text_encoder="fake",
        num_inference_steps=4,
        num_samples=2,
    )
    return ZS3DPipeline(unet, build_scheduler(), proj, cfg, text_encoder=enc)


def scene(rng: np.random.Generator, size: int = 16, classes=(1, 2, 3)) -> tuple[np.ndarray, np.ndarray]:
    img = rng.integers(90, 140, (size, size, 3)).astype(np.uint8)
    lab = np.zeros((size, size), np.uint8)
    for c in rng.choice(classes, size=int(rng.integers(1, 3)), replace=False):
        y, x = rng.integers(0, size - 6, 2)
        img[y : y + 6, x : x + 6] = COLOURS[int(c)]
        lab[y : y + 6, x : x + 6] = c
    lab[0, 0] = 255
    return img, lab


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 6)):
        for i in range(n):
            img, lab = scene(rng, classes=(1, 2, 3, 4))
            write_image(root / "img_dir" / split / f"{i:03d}.png", img)
            write_label(root / "ann_dir" / split / f"{i:03d}.png", lab)
    palette = [[0, 0, 0], *[list(c) for c in COLOURS.values()]]
    write_json(
        root / "meta.json",
        {
            "name": "Squares",
            "classes": CLASSES,
            "palette": palette,
            "unseen": ["green square"],
            "ignore_index": 255,
        },
    )
    return root


# ----------------------------------------------------------------------------------- RS(N) schedule
def test_plan_without_resampling_walks_the_grid_to_clean_data():
    plan = sampling_plan([999, 749, 499, 249])
    assert plan == [
        Step("denoise", 999, 749),
        Step("denoise", 749, 499),
        Step("denoise", 499, 249),
        Step("denoise", 249, -1),
    ]


def test_rs_plan_jumps_back_to_absolute_grid_timesteps():
    grid = [50, 40, 30, 20, 10, 0]
    got = [(s.kind[0], s.t, s.t_next) for s in sampling_plan(grid, resample=1, jump_length=2)]
    assert got == [
        ("d", 50, 40), ("d", 40, 30),
        ("r", 30, 50),  # position 2 -> back 2 positions
        ("d", 50, 40), ("d", 40, 30), ("d", 30, 20), ("d", 20, 10),
        ("r", 10, 30),  # position 4 -> back to position 2
        ("d", 30, 20), ("d", 20, 10), ("d", 10, 0), ("d", 0, -1),
    ]  # fmt: skip


@pytest.mark.parametrize("n,jump,resample", [(30, 5, 3), (25, 1, 2), (7, 3, 10)])
def test_rs_plan_counts_and_consistency_on_strided_grid(n, jump, resample):
    sched = build_scheduler()
    sched.set_timesteps(n)
    grid = [int(t) for t in sched.timesteps]
    plan = sampling_plan(grid, resample, jump)
    den = [s for s in plan if s.kind == "denoise"]
    ren = [s for s in plan if s.kind == "renoise"]
    assert len(ren) == resample * ((n - 1) // jump)
    assert len(den) == n + resample * jump * ((n - 1) // jump)
    pos = {t: i for i, t in enumerate(grid)} | {-1: n}
    for s in den:  # every denoising step goes exactly one grid position down
        assert pos[s.t_next] == pos[s.t] + 1
    for s in ren:  # every jump lands jump_length positions up, on the grid, never from clean data
        assert s.t >= 0 and pos[s.t] - pos[s.t_next] == jump
    for a, b in zip(plan, plan[1:], strict=False):  # the chain is continuous
        assert a.t_next == b.t
    assert plan[0].t == grid[0] and plan[-1].t_next == -1


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="jump_length"):
        sampling_plan([10, 0], resample=1, jump_length=0)
    with pytest.raises(ValueError, match="resample"):
        sampling_plan([10, 0], resample=-1)


# --------------------------------------------------------------------------------- sampler maths
def test_ddim_step_matches_diffusers():
    ours = build_scheduler()
    ref = DDIMScheduler.from_config(ours.config)
    ref.set_timesteps(20)
    torch.manual_seed(0)
    x, eps = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    for t in (999, 499, 19):
        prev = t - 1000 // 20
        expect = ref.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        got = ddim_step(eps, t, prev, x, ours.alphas_cumprod.double())
        assert torch.allclose(got, expect, atol=1e-4), t


def test_v_prediction_converts_to_the_same_ddim_step_as_diffusers():
    ours = build_scheduler(prediction_type="v_prediction")
    ref = DDIMScheduler.from_config(ours.config)
    ref.set_timesteps(10)
    torch.manual_seed(2)
    x, v = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    acp = ours.alphas_cumprod.double()
    for t in (999, 399, 99):
        expect = ref.step(v, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        got = ddim_step(to_epsilon(v, x, t, acp, "v_prediction"), t, t - 100, x, acp)
        assert torch.allclose(got, expect, atol=1e-4), t
    with pytest.raises(ValueError, match="prediction_type"):
        build_scheduler(prediction_type="sample")


def test_ddpm_step_matches_diffusers():
    ours = build_scheduler()
    ref = DDPMScheduler.from_config(ours.config)
    ref.set_timesteps(10)
    torch.manual_seed(1)
    x, eps = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    grid = [int(t) for t in ref.timesteps]
    for i, t in enumerate(grid):
        prev = grid[i + 1] if i + 1 < len(grid) else -1
        expect = ref.step(eps, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        got = ddpm_step(eps, t, prev, x, ours.alphas_cumprod.double(), noise)
        assert torch.allclose(got, expect, atol=1e-4), t


def test_renoise_composes_with_forward_process():
    acp = build_scheduler().alphas_cumprod.double()
    x0 = torch.full((20000,), 0.7)
    g = torch.Generator().manual_seed(0)
    xs = q_sample(x0, 200, acp, torch.randn(x0.shape, generator=g))
    xt = renoise(xs, 200, 600, acp, torch.randn(x0.shape, generator=g))
    # q(x_600 | x_200) composed with q(x_200 | x_0) is q(x_600 | x_0)
    assert abs(xt.mean().item() - 0.7 * acp[600].sqrt().item()) < 0.02
    assert abs(xt.var().item() - (1 - acp[600]).item()) < 0.03
    with pytest.raises(ValueError, match="noisier"):
        renoise(xs, 600, 200, acp, xs)


class RecordingUNet:
    """Fake ε-network: predicts zero noise and records what it is fed."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, torch.Tensor]] = []
        self.image_levels: list[int | None] = []

    def __call__(self, x, t, class_labels=None):
        self.calls.append((int(t[0]), x.clone()))
        self.image_levels.append(None if class_labels is None else int(class_labels[0]))
        return SimpleNamespace(sample=torch.zeros_like(x))


def test_guided_sampling_feeds_the_noised_guide_at_every_absolute_level():
    sched = build_scheduler()
    acp = sched.alphas_cumprod.double()
    guide = torch.rand(1, 3, 32, 32) * 2 - 1
    plan = sampling_plan([999, 799, 599, 399, 199], resample=1, jump_length=2)
    net = RecordingUNet()
    out = guided_sample(
        net, acp, plan, (1, 5, 32, 32), guide, -1, "ddim", generator=torch.Generator().manual_seed(0)
    )
    assert [t for t, _ in net.calls] == [s.t for s in plan if s.kind == "denoise"]
    for t, x in net.calls:  # visual channels = sqrt(a_t) guide + sqrt(1 - a_t) N(0, 1)
        z = (x[:, :3] - acp[t].sqrt() * guide) / (1 - acp[t]).sqrt()
        assert abs(z.mean().item()) < 0.15 and abs(z.std().item() - 1) < 0.15
    assert torch.equal(out[:, :3], guide)  # the clean guide is put back at the end
    assert net.image_levels == [None] * len(net.calls)  # the original architecture: one timestep


def test_on_step_sees_every_denoising_step_and_the_last_estimate_is_the_sample():
    acp = build_scheduler().alphas_cumprod.double()
    guide = torch.rand(2, 3, 8, 8) * 2 - 1
    plan = sampling_plan([999, 799, 599, 399, 199], resample=1, jump_length=2)
    net, seen = RecordingUNet(), []

    def on_step(i, step, x0):
        seen.append((i, step.t, x0.clone()))

    g = torch.Generator().manual_seed(0)
    out = guided_sample(net, acp, plan, (2, 5, 8, 8), guide, -1, "ddim", generator=g, on_step=on_step)
    denoise = [s.t for s in plan if s.kind == "denoise"]
    assert [i for i, _, _ in seen] == list(range(len(denoise))) and [t for _, t, _ in seen] == denoise
    for (t, x), (_, _, x0) in zip(net.calls, seen, strict=True):  # zero ε: x̂_0 = x / sqrt(a_t), clipped
        assert torch.allclose(x0, (x / acp[t].sqrt()).clamp(-1, 1).float(), atol=1e-5)
    assert torch.allclose(out[:, 3:], seen[-1][2][:, 3:], atol=1e-5)  # DDIM's last step lands on x̂_0


def test_clean_guidance_feeds_the_clean_image_with_image_timestep_zero():
    acp = build_scheduler().alphas_cumprod.double()
    guide = torch.rand(1, 3, 8, 8) * 2 - 1
    plan = sampling_plan([999, 500, 100])
    net = RecordingUNet()
    g = torch.Generator().manual_seed(0)
    guided_sample(
        net, acp, plan, (1, 5, 8, 8), guide, -1, generator=g, guide_noise="clean", image_timestep=True
    )
    assert net.image_levels == [0, 0, 0]
    for _, x in net.calls:
        assert torch.allclose(x[:, :3], guide, atol=0.05)  # level 0: sqrt(1 - a_0) = 0.01 noise
    net = RecordingUNet()
    guided_sample(net, acp, plan, (1, 5, 8, 8), guide, -1, generator=g, image_timestep=True)
    assert net.image_levels == [999, 500, 100]  # matched guidance on a decoupled model
    with pytest.raises(ValueError, match="decoupled"):
        guided_sample(net, acp, plan, (1, 5, 8, 8), guide, -1, guide_noise="clean")


def test_partial_guidance_and_unconditional_sampling():
    acp = build_scheduler().alphas_cumprod.double()
    grid = [300, 200, 100, 50, 10]
    assert guidance_threshold(grid, 0.0) is None
    assert guidance_threshold(grid, 0.4) == 200
    assert guidance_threshold(grid, 1.0) == 10
    with pytest.raises(ValueError, match="rho"):
        guidance_threshold(grid, 1.5)
    guide = torch.ones(1, 3, 8, 8) * 0.5
    net = RecordingUNet()
    g = torch.Generator().manual_seed(0)
    out = guided_sample(net, acp, sampling_plan(grid), (1, 4, 8, 8), guide, 200, generator=g)
    fed = dict(net.calls)

    def carried(t: int, t_next: int) -> torch.Tensor:  # what the zero-ε model hands on without guidance
        return ddim_step(torch.zeros_like(fed[t]), t, t_next, fed[t], acp)[:, :3]

    assert not torch.allclose(fed[200][:, :3], carried(300, 200))  # replaced by the noised guide
    assert torch.allclose(fed[100][:, :3], carried(200, 100))  # strength 0.4: free from here on
    assert torch.allclose(fed[10][:, :3], carried(50, 10))
    assert not torch.equal(out[:, :3], guide)
    uncond = guided_sample(RecordingUNet(), acp, sampling_plan(grid), (1, 4, 8, 8), None, None, generator=g)
    assert uncond.shape == (1, 4, 8, 8)


# ---------------------------------------------------------------------------------- classifier
def test_class_scores_and_calibrated_stacking():
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])  # seen, seen, unseen
    emb = torch.tensor([[1.0, 0.1], [0.6, 0.8]]).T.reshape(1, 2, 1, 2)  # pixel 0 ~ class 0, pixel 1 ~ between
    scores = class_scores(emb, codes)
    assert scores.shape == (1, 3, 1, 2)
    seen = torch.tensor([1.0, 1.0, 0.0])
    assert scores.argmax(1).tolist() == [[[0, 2]]]
    plain = calibrate_scores(scores, seen, 0.0).argmax(1)
    assert plain.tolist() == scores.argmax(1).tolist()
    cal = calibrate_scores(scores, seen, 0.5).argmax(1)
    assert cal.tolist() == [[[2, 2]]]  # a large margin hands even the confident pixel to the unseen class


def test_sweep_margin_finds_the_working_margin():
    # 2 seen classes + 1 unseen; unseen pixels look like class 1 with a smaller score
    gt = np.array([[0, 0, 1, 1, 2, 2]])
    scores = np.zeros((3, 1, 6), np.float32)
    scores[0, 0, :2] = 0.9
    scores[1, 0, 2:4] = 0.9
    scores[1, 0, 4:] = 0.5
    scores[2, 0, 4:] = 0.3  # needs gamma in (0.2, 0.6) to become unseen without flipping seen pixels
    best = sweep_margin([scores], [gt], np.array([1, 1, 0]), [0, 1], [2], np.linspace(0, 1, 21))
    assert 0.2 < best["gamma"] < 0.6 and best["hIoU"] == pytest.approx(100.0)
    assert best["gamma"] == min(r["gamma"] for r in best["curve"] if r["hIoU"] == best["hIoU"])
    no_cal = best["curve"][0]
    assert no_cal["gamma"] == 0 and no_cal["mIoU_unseen"] == 0


def test_projection_fit_save_load_and_pseudo_unseen(tmp_path):
    enc = FakeEncoder()
    emb = enc.encode_classes(CLASSES)
    proj = SemanticProjection.fit(emb, CLASSES, 3, text_encoder="fake")
    codes = proj(emb)
    assert codes.shape == (5, 3) and codes.abs().max().item() == pytest.approx(1.0)
    proj.save_pretrained(tmp_path / "p")
    again = SemanticProjection.from_pretrained(tmp_path / "p")
    assert torch.allclose(again(emb), codes) and again.config.fitted_on == CLASSES
    with pytest.raises(ValueError, match="semantic_channels"):
        SemanticProjection.fit(emb, CLASSES, 5)
    pseudo = pseudo_unseen_classes(codes, CLASSES, ["green square"])
    assert len(pseudo) == 1 and pseudo[0] not in ("background", "green square")


# -------------------------------------------------------------------------------------- pipeline
def test_pipeline_call_save_load_and_any_class_names(tmp_path):
    pipe = tiny_pipeline()
    rng = np.random.default_rng(0)
    images = [scene(rng)[0] for _ in range(2)]
    out = pipe(images, output_size=24, generator=torch.Generator().manual_seed(3))
    assert out.labels.shape == (2, 24, 24) and out.labels.dtype == np.int64
    assert out.scores.shape == (2, 5, 24, 24) and out.uncertainty.shape == (2, 24, 24)
    assert out.class_names == CLASSES and out.extras["embeddings"].shape == (2, 3, 16, 16)
    pipe.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ZS3DPipeline.from_pretrained(tmp_path / "ckpt", num_samples=1)
    loaded._text_encoder = FakeEncoder()
    again = loaded(images, output_size=24, num_samples=2, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(again.labels, out.labels)  # same weights, same seed -> same result
    names = ["background", "purple triangle", "red square"]  # a class never trained on, by name
    kw = {"class_names": names, "num_inference_steps": 2, "resample": 1, "jump_length": 1}
    raw = loaded(images[0], calibration=0.0, generator=torch.Generator().manual_seed(1), **kw)
    cal = loaded(images[0], calibration=0.3, generator=torch.Generator().manual_seed(1), **kw)
    assert cal.labels.max() < 3 and cal.extras["seen"] == ["background", "red square"]
    np.testing.assert_allclose(
        cal.scores, raw.scores - 0.3 * np.array([1, 0, 1])[None, :, None, None], atol=1e-6
    )


def test_segment_files_writes_labels_for_any_class_names(dataset, tmp_path):
    from diffuseg.methods.base import segment_files

    pipe = tiny_pipeline()
    written = segment_files(
        pipe, dataset / "img_dir" / "val", tmp_path / "seg", batch_size=4, progress=False,
        class_names=["background", "red square", "purple circle"], num_samples=1,
    )  # fmt: skip
    assert len(written) == 6 and read_label(written[0]).max() < 3
    assert (tmp_path / "seg" / f"{written[0].stem}_overlay.png").is_file()


def test_pipeline_rejects_bad_input():
    pipe = tiny_pipeline()
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="sampler"):
        pipe(img, sampler="euler")
    with pytest.raises(ValueError, match="num_samples"):
        pipe(img, num_samples=0)
    with pytest.raises(ValueError, match="uint8"):
        pipe(np.zeros((16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="output_size"):
        pipe([img, np.zeros((20, 20, 3), np.uint8)])
    with pytest.raises(ValueError, match="guide"):
        pipe.generate(2, rho=0.5)
    with pytest.raises(ValueError, match="inconsistent"):
        ZS3DPipeline(tiny_pipeline("regression").unet, pipe.scheduler, pipe.projection, pipe.config)


def test_regression_baseline_uses_the_same_classifier():
    pipe = tiny_pipeline("regression")
    img = np.random.default_rng(1).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    out = pipe(img, num_samples=5)  # sampling arguments do not apply to the one-pass baseline
    assert out.uncertainty is None and out.labels.shape == (1, 16, 16)
    emb = torch.from_numpy(out.extras["embeddings"])
    expect = class_scores(emb, pipe.class_codes(CLASSES))
    expect = calibrate_scores(expect, pipe.seen_mask(CLASSES), pipe.config.calibration).argmax(1)
    np.testing.assert_array_equal(out.labels[0], expect[0].numpy())
    with pytest.raises(ValueError, match="regression"):
        pipe.generate(1)


def test_evaluate_reports_seen_unseen_and_warns_on_meta_mismatch(dataset, caplog):
    pipe = tiny_pipeline()
    report = evaluate_zs3d(pipe, dataset, "val", limit=4, progress=False, num_samples=1)
    assert report["num_images"] == 4
    assert {"mIoU_seen", "mIoU_unseen", "hIoU"} <= set(report["metrics"])
    pipe.config.unseen = ["blue square"]
    with caplog.at_level(logging.WARNING):
        evaluate_zs3d(pipe, dataset, "val", limit=1, progress=False, num_samples=1)
    assert "trained without" in caplog.text


# -------------------------------------------------------------------------------------- training
def test_labels_are_resized_nearest_and_unseen_protocol(dataset):
    arrays = load_split_arrays(dataset, "train", 8)
    assert arrays.images.shape == (48, 8, 8, 3) and arrays.labels.dtype == np.uint8
    assert set(np.unique(arrays.labels)) <= {0, 1, 2, 3, 4, 255}  # no blended ids
    excl, rec = select_training_images(arrays, CLASSES, ["green square"], "exclude_images")
    assert not (excl.labels == 3).any() and rec["images_used"] == len(excl.ids) < 48
    ign, rec2 = select_training_images(arrays, CLASSES, ["green square"], "ignore_pixels")
    assert len(ign.ids) == 48 and not (ign.labels == 3).any()
    assert ((arrays.labels == 3) == ((ign.labels == 255) & (arrays.labels != 255))).all()
    with pytest.raises(ValueError, match="unseen_policy"):
        select_training_images(arrays, CLASSES, [], "drop")


def test_decoupled_image_noise_levels_and_clean_guidance_pipeline():
    pipe = tiny_pipeline(decoupled=True)
    assert pipe.image_timestep and not tiny_pipeline().image_timestep
    arrays = SplitArrays(np.zeros((2, 16, 16, 3), np.uint8), np.zeros((2, 16, 16), np.uint8), ["a", "b"])
    codes = pipe.class_codes(CLASSES)
    t = torch.arange(0, 1000, 10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(
        ZS3DTask(pipe, arrays, codes, image_noise={"matched": 1, "clean": 0, "uniform": 0})._image_levels(
            t, g
        ),
        t,
    )
    clean = ZS3DTask(pipe, arrays, codes, image_noise={"matched": 0, "clean": 1, "uniform": 0})
    assert (clean._image_levels(t, g) == 0).all()
    levels = ZS3DTask(pipe, arrays, codes)._image_levels(t, g)
    assert 0.3 < (levels == t).float().mean() < 0.7 and (levels == 0).any()
    batch = {"image": torch.zeros(2, 3, 16, 16), "label": torch.zeros(2, 16, 16, dtype=torch.long)}
    loss, _ = clean.loss(clean.model(), batch, torch.Generator().manual_seed(0))
    loss.backward()
    with pytest.raises(ValueError, match="image_noise"):
        ZS3DTask(pipe, arrays, codes, image_noise={"blurred": 1.0})
    img = np.full((16, 16, 3), 100, np.uint8)
    out = pipe(img, guide_noise="clean", generator=torch.Generator().manual_seed(0))
    assert out.labels.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="decoupled"):
        tiny_pipeline()(img, guide_noise="clean")


def test_ddpm_loss_masks_ignore_pixels():
    pipe = tiny_pipeline()
    codes = pipe.class_codes(CLASSES)
    arrays = SplitArrays(np.zeros((2, 16, 16, 3), np.uint8), np.full((2, 16, 16), 255, np.uint8), ["a", "b"])
    task = ZS3DTask(pipe, arrays, codes)
    batch = {"image": torch.zeros(2, 3, 16, 16), "label": torch.full((2, 16, 16), 255)}
    loss, logs = task.loss(task.model(), batch, torch.Generator().manual_seed(0))
    assert logs["mse_semantic"] == 0.0 and logs["mse_image"] > 0 and loss.requires_grad


def test_semantic_snr_floor_only_raises_the_semantic_weight():
    pipe = tiny_pipeline()
    codes = pipe.class_codes(CLASSES)
    arrays = SplitArrays(np.zeros((8, 16, 16, 3), np.uint8), np.zeros((8, 16, 16), np.uint8), ["a"] * 8)
    batch = {"image": torch.rand(8, 3, 16, 16), "label": torch.zeros(8, 16, 16, dtype=torch.long)}
    model = pipe.unet.eval()
    plain, plain_logs = ZS3DTask(pipe, arrays, codes).loss(model, batch, torch.Generator().manual_seed(0))
    task = ZS3DTask(pipe, arrays, codes, semantic_snr_floor=1.0)
    floored, logs = task.loss(model, batch, torch.Generator().manual_seed(0))
    assert logs["mse_semantic"] == plain_logs["mse_semantic"]  # the same draws, only the weights differ
    assert floored > plain


TINY_CONFIG = """
seed: 0
model:
  type: {type}
  image_size: 16
  semantic_channels: 3
  decoupled_noise: {decoupled}
  unet: {{block_out_channels: [8, 16], layers_per_block: 1, attention_levels: [], attention_head_dim: 8,
          norm_num_groups: 4}}
pipeline: {{num_inference_steps: 3, num_samples: 1, batch_size: 16, guide_noise: {noise}}}
train: {{max_steps: 3, batch_size: 8, lr: 1.0e-3, checkpoint_every: 3, log_every: 1, ema_decay: 0.9}}
calibration:
  num_holdout: 6
  gammas: {{start: 0, stop: 0.5, num: 6}}
  train: {{max_steps: 2, batch_size: 4}}
eval: {{num_images: 2}}
model_card: {{num_val: 2}}
"""


@pytest.mark.parametrize("kind", ["ddpm", "regression"])
def test_cli_train_runs_every_stage_and_resumes(dataset, tmp_path, monkeypatch, kind):
    import diffuseg.text

    monkeypatch.setattr(diffuseg.text, "get_text_encoder", lambda name="minilm", **kw: FakeEncoder())
    from diffuseg.cli import app

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(type=kind, decoupled=kind == "ddpm", noise="clean"))
    out = tmp_path / "run"
    args = ["train", "zs3d", "--data", str(dataset), "--out", str(out), "--config", str(cfg), "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    final = out / "final"
    config = json.loads((final / "zs3d_config.json").read_text())
    assert config["unseen"] == ["green square"] and config["model_type"] == kind
    assert config["training"]["excluded_classes"] == ["green square"]
    info = config["calibration_info"]
    assert info["num_holdout"] == 6 and len(info["pseudo_unseen"]) == 1
    assert info["calibration_training"]["excluded_classes"] == ["green square", *info["pseudo_unseen"]]
    assert config["calibration"] == info["gamma"]
    assert "hIoU" in (final / "README.md").read_text() and (final / "samples.png").is_file()
    history = (final / "README.md").read_text().split("## Training history")[1].split("## Calibration")[0]
    assert "| main | 0 → " in history and "| calibration | 0 → " in history  # both loops' sessions
    mtime = (final / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime
    res = CliRunner().invoke(app, args)  # everything done: nothing is retrained
    assert (
        res.exit_code == 0
        and (final / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime == mtime
    )


def test_augment_writes_dataset_layout_and_resumes(dataset, tmp_path):
    pipe = tiny_pipeline()
    out = augment_dataset(pipe, dataset, tmp_path / "aug", rho=0.5, num=5, batch_size=4, progress=False)
    labels = sorted((out / "ann_dir" / "train").glob("*.png"))
    assert len(labels) == 5 and len(list((out / "img_dir" / "train").glob("*.png"))) == 5
    lab = read_label(labels[0])
    assert lab.shape == (16, 16) and lab.max() < len(CLASSES)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == CLASSES and meta["augmentation"]["rho"] == 0.5
    records = [json.loads(x) for x in (out / "augment.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(r["guide"] for r in records)
    before = labels[0].read_bytes()
    augment_dataset(pipe, dataset, tmp_path / "aug", rho=0.5, num=5, batch_size=4, progress=False)
    assert labels[0].read_bytes() == before
    with pytest.raises(ValueError, match="differ"):
        augment_dataset(pipe, dataset, dataset, rho=0.0, num=1)
    from diffuseg.cli import app

    res = CliRunner().invoke(
        app, ["augment", "--method", "ddpm-seg", "--data", str(dataset), "--out", str(tmp_path)]
    )
    assert res.exit_code == 2 and "only zs3d" in res.output
