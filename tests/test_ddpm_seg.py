"""DDPM-Segmentation: streaming features, the original's classifier rules, pipeline, CLI, DatasetDDPM.

Everything runs on tiny models built in code (a random SD-shaped UNet, a UNet2DModel, RGB+xy features).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from diffuseg.io import read_image
from diffuseg.methods.ddpm_seg import (
    DDPMSegPipeline,
    DiffusionFeatures,
    FeatureConfig,
    PixelEnsemble,
    PixelGatherer,
    PixelMLP,
    RGBXYFeatures,
    apply_view,
    build_feature_source,
    combine_logits,
    group_maps,
    image_uncertainty,
    invert_view,
)
from diffuseg.train.ddpm_seg import (
    EnsembleTrainConfig,
    FeatureStore,
    augment_labelled,
    build_feature_store,
    drop_small_classes,
    fit_ddpm_seg,
    recalibrate_batchnorm,
    train_ensemble,
    train_ensemble_lockstep,
    train_pixel_classifier,
)

CLASSES = ["background", "red", "blue"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CI machine has 2 shared cores: one thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _scene(seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Two coloured rectangles on a dark noisy background, with their label map."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 30, np.uint8)
    lab = np.zeros((size, size), np.int64)
    t, l = rng.integers(0, size // 2, 2)
    img[t : t + size // 3, l : l + size // 3] = (210, 40, 40)
    lab[t : t + size // 3, l : l + size // 3] = 1
    t, l = rng.integers(size // 3, size - size // 4, 2)
    img[t : t + size // 4, l : l + size // 4] = (40, 40, 210)
    lab[t : t + size // 4, l : l + size // 4] = 2
    img = np.clip(img.astype(int) + rng.integers(0, 25, img.shape), 0, 255).astype(np.uint8)
    return img, lab


@pytest.fixture(scope="module")
def scenes():
    pairs = [_scene(i) for i in range(4)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from diffuseg.backbones.presets import tiny_sd_backbone

    d = tmp_path_factory.mktemp("tiny_sd")
    model = tiny_sd_backbone(d, sample_size=8)  # 64-px images -> 8² latents
    model.save_pretrained(d / "model")
    return model, d / "model"


def _fast(**kw) -> EnsembleTrainConfig:
    values = {"num_models": 3, "max_iterations": 80, "stop_after_epoch": 0, "patience": 1000}
    values.update(kw)
    return EnsembleTrainConfig(**values)


# ------------------------------------------------------------------------ streaming features
@pytest.mark.parametrize("size", [13, 32, 5])
def test_gather_is_bilinear_upsampling(size):
    maps = [torch.randn(2, 5, 4, 4), torch.randn(2, 3, 7, 7), torch.randn(2, 4, 4, 4)]
    groups = group_maps(maps)
    assert [g.shape for g in groups] == [(2, 4, 4, 9), (2, 7, 7, 3)]  # equal sizes share one array
    gath = PixelGatherer([g.shape[1:] for g in groups], size)
    n, rem = np.divmod(np.arange(2 * size * size), size * size)
    ys, xs = np.divmod(rem, size)
    got = gath.gather(groups, n, ys, xs).view(2, size, size, -1)
    ref = torch.cat(
        [
            F.interpolate(torch.from_numpy(g).permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear")
            for g in groups
        ],
        dim=1,
    ).permute(0, 2, 3, 1)
    assert torch.allclose(got, ref, atol=1e-5)


def test_feature_store_on_disk_roundtrip(tmp_path, scenes):
    images, labels = scenes
    src = RGBXYFeatures(32)
    store = build_feature_store(src, images, labels, tmp_path / "s", fingerprint="abc", progress=False)
    assert isinstance(store.groups[0], np.memmap) and store.channels == 5
    assert (tmp_path / "s" / "group_0.npy").is_file() and not (tmp_path / "s" / ".partial").exists()
    again = FeatureStore.find(tmp_path / "s", "abc")
    assert again is not None and FeatureStore.find(tmp_path / "s", "other") is None
    flat = again.valid_pixels()[:50]
    x, y = again.batch(flat)
    n, rem = np.divmod(flat, 32 * 32)
    assert torch.equal(y, torch.from_numpy(np.stack(labels).reshape(-1)[flat]))
    rgb = torch.from_numpy(np.stack(images)[n, rem // 32, rem % 32] / 127.5 - 1).float()
    assert torch.allclose(x[:, :3], rgb, atol=2e-3)  # float16 storage


def test_small_classes_are_ignored():
    lab = np.zeros((10, 10), np.int64)
    lab[0, :5] = 3  # 5 px < 20
    lab[5:, 5:] = 4  # 25 px
    out = drop_small_classes(lab, 20)
    assert (out[0, :5] == 255).all() and (out[5:, 5:] == 4).all() and (out[lab == 0] == 0).all()


# ------------------------------------------------------------------------ classifier and ensemble
@pytest.mark.parametrize(("classes", "widths"), [(11, (128, 32)), (30, (256, 128))])
def test_pixel_mlp_matches_the_original(classes, widths):
    mlp = PixelMLP(500, classes).init_weights(torch.Generator().manual_seed(0))
    lins = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    assert [lin.out_features for lin in lins] == [*widths, classes]
    assert [type(m).__name__ for m in mlp.layers[:3]] == ["Linear", "ReLU", "BatchNorm1d"]
    w, b = lins[0].weight.detach(), lins[0].bias.detach()
    assert abs(float(w.std()) - 0.02) < 0.002 and float(b.abs().max()) == 0.0
    drop = PixelMLP(500, classes, dropout=0.4)
    assert [type(m).__name__ for m in drop.layers[:4]] == ["Linear", "ReLU", "Dropout", "BatchNorm1d"]


def test_vote_and_js_uncertainty():
    sure = torch.tensor([[5.0, 0.0, 0.0]])
    other = torch.tensor([[0.0, 5.0, 0.0]])
    labels, js, _ = combine_logits([sure, sure, sure])
    assert labels.item() == 0 and js.item() == pytest.approx(0.0, abs=1e-6)
    labels, js, p = combine_logits([sure, other, other])
    assert labels.item() == 1 and js.item() > 0.3 and torch.allclose(p.sum(1), torch.ones(1))
    labels, _, _ = combine_logits([sure, other])  # a tie goes to the smaller id (torch.mode)
    assert labels.item() == 0
    values = torch.arange(100.0)
    assert image_uncertainty(values) == pytest.approx(float(values[90:].mean()))
    assert image_uncertainty(torch.tensor([3.0, 1.0])) == 3.0  # at least one pixel


def test_early_stopping_rule_and_cap(scenes):
    images, labels = scenes
    store = build_feature_store(RGBXYFeatures(32), images, labels, progress=False)
    per_epoch = -(-store.valid_pixels().size // 64)
    cfg = EnsembleTrainConfig(num_models=1, stop_after_epoch=1, patience=0)
    _, st = train_pixel_classifier(store, 3, cfg)
    # stopping is only armed after epoch index 1; with patience 0 it fires in epoch index 2
    assert st["epochs"] == 3 and 2 * per_epoch < st["iterations"] < 3 * per_epoch
    _, st = train_pixel_classifier(store, 3, EnsembleTrainConfig(num_models=1, max_iterations=7))
    assert st["iterations"] == 7


def test_lockstep_members_equal_sequential_training(scenes):
    """Stacked training reproduces each member's own trajectory (same init, data order, stopping rule)."""
    images, labels = scenes
    store = build_feature_store(RGBXYFeatures(32), images, labels, progress=False)
    cfg = EnsembleTrainConfig(num_models=3, max_iterations=40)
    states, stats = train_ensemble_lockstep(store, 3, cfg)
    x, _ = store.batch(store.valid_pixels()[::7])
    for i, state in enumerate(states):
        alone = train_pixel_classifier(store, 3, cfg, index=i)[0]
        stacked = PixelMLP(store.channels, 3)
        stacked.load_state_dict(state)
        with torch.no_grad():  # float rounding differs (bmm vs mm) and Adam amplifies it on ~0 gradients
            pa, pb = alone(x).softmax(1), stacked.eval()(x).softmax(1)
        assert (pa.argmax(1) == pb.argmax(1)).float().mean() > 0.99 and (pa - pb).abs().max() < 0.05
    assert [s["iterations"] for s in stats] == [40, 40, 40]
    _, stats = train_ensemble_lockstep(
        store, 3, EnsembleTrainConfig(num_models=3, stop_after_epoch=1, patience=0)
    )
    assert all(s["epochs"] == 3 for s in stats)


def test_ensemble_resumes_from_work_dir(tmp_path, scenes):
    images, labels = scenes
    store = build_feature_store(
        RGBXYFeatures(32), images, labels, tmp_path / "s", fingerprint="f", progress=False
    )
    ens, stats = train_ensemble(store, 3, _fast(num_models=2), tmp_path, progress=False)
    assert len(list(tmp_path.glob("mlp_*.safetensors"))) == 2 and "iterations" in stats[0]
    again, stats2 = train_ensemble(store, 3, _fast(num_models=2), tmp_path, progress=False)
    assert all(s.get("reused") for s in stats2)
    for a, b in zip(ens.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_batchnorm_re_estimation_removes_the_dropout_variance_shift(tmp_path, scenes):
    """Dropout before BatchNorm inflates the variance BN learns; re-estimation with Dropout off gives the
    statistics of the activations BN sees at test time, and leaves every weight alone."""
    images, labels = scenes
    store = build_feature_store(
        RGBXYFeatures(32), images, labels, tmp_path / "s", fingerprint="f", progress=False
    )
    cfg = _fast(num_models=2, dropout=0.4, recalibrate_bn=False)
    raw, _ = train_ensemble(store, 3, cfg, tmp_path, progress=False)
    fixed, _ = train_ensemble(store, 3, _fast(num_models=2, dropout=0.4), tmp_path, progress=False)
    for name, a in raw.state_dict().items():  # same cached weights; only BatchNorm statistics moved
        b = fixed.state_dict()[name]
        assert torch.equal(a, b) == ("running" not in name and "num_batches" not in name), name
    var = [
        m.running_var.mean() for e in (raw, fixed) for m in e.modules() if isinstance(m, torch.nn.BatchNorm1d)
    ]
    assert var[0] > var[2] and var[1] > var[3]  # the shift: train-time variance above test-time variance
    # one batch over every labelled pixel: the statistics are exactly the eval-mode activations'
    mlp = raw.models[0]
    used = recalibrate_batchnorm([mlp], store, num_pixels=10**7, batch_size=10**7)
    x, _ = store.batch(np.sort(store.valid_pixels()))
    assert used == x.shape[0]
    with torch.no_grad():
        h = mlp.layers[1](mlp.layers[0](x))  # Linear, ReLU: what the first BatchNorm sees without Dropout
    bn = next(m for m in mlp.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var(0), rtol=1e-3, atol=1e-6)
    assert bn.momentum == 0.1 and not mlp.training


# ------------------------------------------------------------------------ augmentation
def test_augmentation_moves_labels_with_the_image():
    img, lab = _scene(3, 48)
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    y = torch.from_numpy(lab)
    g = torch.Generator().manual_seed(0)
    fx, fy = augment_labelled(x, y, g, p=1.0, ops=("flip",))
    assert torch.equal(fy, y.flip(-1)) and torch.allclose(fx, x.flip(-1), atol=1e-5)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        ax, ay = augment_labelled(x, y, g, p=1.0, ops=("crop", "rotate", "elastic"))
        valid = ay != 255
        assert valid.float().mean() > 0.5
        # where the warped label says "red" / "blue", the warped image is red / blue
        red, blue = (ay == 1) & valid, (ay == 2) & valid
        assert (ax[0][red] > ax[2][red]).float().mean() > 0.9
        assert (ax[2][blue] > ax[0][blue]).float().mean() > 0.9
    dx, dy = augment_labelled(x, y, torch.Generator().manual_seed(1), p=1.0, ops=("dropout",))
    holes = dy == 255
    assert holes.any() and (dx[:, holes] == 0).all()
    with pytest.raises(ValueError, match="unknown augmentations"):
        augment_labelled(x, y, g, ops=("mixup",))


def test_augmented_store_has_copies(scenes):
    images, labels = scenes
    store = build_feature_store(
        RGBXYFeatures(32),
        images[:2],
        labels[:2],
        augment=True,
        augment_copies=2,
        augment_p=1.0,
        progress=False,
    )
    assert store.num_images == 6
    stored = np.asarray(store.labels)
    assert np.array_equal(stored[0], labels[0]) and (stored[1] == 255).any()  # dropout / borders ignored


# ------------------------------------------------------------------------ pipeline
def test_rgbxy_pipeline_learns_and_roundtrips(tmp_path, scenes):
    images, labels = scenes
    pipe = fit_ddpm_seg(
        images, labels, CLASSES, FeatureConfig(kind="rgbxy", resolution=32), _fast(), progress=False
    )
    out = pipe(images)
    assert out.labels.shape == (4, 32, 32) and out.scores.shape == (4, 3, 32, 32)
    assert (out.labels == np.stack(labels)).mean() > 0.95
    assert out.uncertainty.shape == (4, 32, 32) and len(out.extras["image_uncertainty"]) == 4
    pipe.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["features"]["kind"] == "rgbxy" and cfg["class_names"] == CLASSES
    assert cfg["ensemble"]["num_models"] == 3 and cfg["training"]["num_labelled"] == 4
    loaded = DDPMSegPipeline.from_pretrained(tmp_path / "ckpt")
    again = loaded(images, class_names=CLASSES)
    assert np.array_equal(again.labels, out.labels)
    big = loaded(images[:1], output_size=64, tta=True)
    assert big.labels.shape == (1, 64, 64) and big.extras["tta_agreement"].shape == (1, 64, 64)
    with pytest.raises(ValueError, match="trained for the classes"):
        loaded(images, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="uint8"):
        loaded(np.zeros((32, 32, 3), np.float32))


def test_projected_inference_equals_direct(scenes):
    """First layer before upsampling = the ensemble's own prediction on upsampled features."""
    images, labels = scenes
    pipe = fit_ddpm_seg(
        images, labels, CLASSES, FeatureConfig(kind="rgbxy", resolution=32), _fast(), progress=False
    )
    groups = group_maps(RGBXYFeatures(32).maps(pipe.preprocess(images[:2])))
    lab, js, probs = pipe.classify_groups(groups, 48)
    gath = PixelGatherer([g.shape[1:] for g in groups], 48)
    n, rem = np.divmod(np.arange(2 * 48 * 48), 48 * 48)
    d_lab, d_js, d_p = pipe.ensemble.predict(gath.gather(groups, n, *np.divmod(rem, 48)))
    assert (lab.reshape(-1) == d_lab).float().mean() > 0.999
    assert torch.allclose(probs.permute(0, 2, 3, 1).reshape(-1, 3), d_p, atol=1e-4)


def test_tta_views_invert():
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    for view in ("identity", "hflip", "colour", "grey", "hflip+colour"):
        y = apply_view(x, view)
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    lab = torch.arange(64).view(1, 8, 8)
    assert torch.equal(invert_view(lab.flip(-1), "hflip"), lab)


def test_diffusion_features_from_saved_backbone(tiny_sd, scenes):
    model, path = tiny_sd
    cfg = FeatureConfig(backbone=str(path), layers=["up_blocks.1", "up_blocks.3"], timesteps=[10, 200])
    src = build_feature_source(cfg)
    assert src.resolution == 64
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    maps = src.maps(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 4, 4), (8, 8, 8)] * 2
    assert not torch.equal(maps[0], maps[2])  # timesteps differ
    images, labels = scenes
    up = [np.kron(im, np.ones((2, 2, 1), np.uint8)) for im in images]
    lab = [np.kron(la, np.ones((2, 2), np.int64)) for la in labels]
    pipe = fit_ddpm_seg(up, lab, CLASSES, cfg, _fast(num_models=2, max_iterations=40), progress=False)
    out = pipe(up[:2])
    assert out.labels.shape == (2, 64, 64) and set(np.unique(out.labels)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="channels"):
        DDPMSegPipeline(DiffusionFeatures(["up_blocks.3"], [10], backbone=model), pipe.ensemble, CLASSES)(
            up[:1]
        )


def test_random_backbone_is_seeded():
    from diffuseg.methods.ddpm_seg import load_feature_backbone

    a, b = load_feature_backbone("random:mini-sd", 3), load_feature_backbone("random:mini-sd", 3)
    assert torch.equal(next(a.unet.parameters()), next(b.unet.parameters()))
    with pytest.raises(ValueError, match="random backbone preset"):
        load_feature_backbone("random:sd-xl", 0)


def test_pixel_space_unet2d_source(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
    )  # fmt: skip
    unet.save_pretrained(tmp_path / "ddpm" / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "ddpm" / "scheduler")
    src = build_feature_source(
        FeatureConfig(
            kind="unet2d", backbone=str(tmp_path / "ddpm"), layers=["up_blocks.0"], timesteps=[5, 50]
        )
    )
    maps = src.maps(torch.zeros(1, 3, 16, 16))
    assert src.resolution == 16 and [tuple(m.shape) for m in maps] == [(1, 16, 16, 16)] * 2
    with pytest.raises(ValueError, match="outside"):
        build_feature_source(
            FeatureConfig(
                kind="unet2d", backbone=str(tmp_path / "ddpm"), layers=["up_blocks.0"], timesteps=[500]
            )
        )


def test_efficientnet_lite0_features():
    from diffuseg.backbones.imagenet import EfficientNetLite0Features

    enc = EfficientNetLite0Features(input_size=64)
    assert enc.channels == [16, 24, 40, 80, 112, 192, 320]
    maps = enc(torch.zeros(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps][:3] == [(16, 32, 32), (24, 16, 16), (40, 8, 8)]
    assert maps[-1].shape[-1] == 2
    with pytest.raises(ValueError, match="blocks"):
        EfficientNetLite0Features(blocks=[16], pretrained=False)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="kind"):
        FeatureConfig(kind="vit")
    with pytest.raises(ValueError, match="unknown feature settings"):
        FeatureConfig.from_dict({"layer": ["up_blocks.0"]})
    with pytest.raises(ValueError, match="optimizer"):
        EnsembleTrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="num_models"):
        PixelEnsemble(5, 3, 0)


# ------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    from diffuseg.data.fashion_scenes import generate_fashion_scenes

    d = tmp_path_factory.mktemp("fs") / "fs"
    return generate_fashion_scenes(d, 6, 3, seed=0, size=64, progress=False)


def test_cli_train_segment_evaluate(tmp_path, fashion, monkeypatch):
    from diffuseg.cli import app
    from diffuseg.methods import METHODS

    monkeypatch.setitem(METHODS, "ddpm-seg", ("diffuseg.methods.ddpm_seg", "DDPMSegPipeline", False))
    runner = CliRunner()
    ckpt = tmp_path / "ckpt"
    args = ["train", "ddpm-seg", "--data", str(fashion), "--num-labels", "3", "--features", "rgbxy",
            "--num-models", "2", "--augment", "--adamw-dropout", "--set", "ensemble.max_iterations=20",
            "--set", "ensemble.augment_copies=1", "--evaluate", "val", "--out", str(ckpt), "-q"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["training"]["recipe"]["optimizer"] == "adamw" and cfg["ensemble"]["dropout"] == 0.4
    assert cfg["training"]["stored_images"] == 6 and len(cfg["training"]["labelled_ids"]) == 3
    card = (ckpt / "README.md").read_text()
    assert "3 labelled images" in card and "Evaluation on" in card and (ckpt / "eval_val.json").is_file()
    assert "- command: `diffuseg" in card  # sys.argv: pytest's own under CliRunner
    assert "![sample](sample.png)" in card and read_image(ckpt / "sample.png").shape[2] == 3
    img = fashion / "img_dir" / "val"
    res = runner.invoke(app, ["segment", str(img), "--method", "ddpm-seg", "--checkpoint", str(ckpt),
                              "--out", str(tmp_path / "seg"), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "seg").glob("*_uncertainty.png"))) == 3
    rep = tmp_path / "rep.json"
    res = runner.invoke(app, ["evaluate", "--method", "ddpm-seg", "--checkpoint", str(ckpt), "--data",
                              str(fashion), "--json", str(rep), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(rep.read_text())["num_images"] == 3
    bad = runner.invoke(app, ["train", "ddpm-seg", "--data", str(fashion), "--num-labels", "99",
                              "--features", "rgbxy", "--out", str(tmp_path / "x"), "-q"])  # fmt: skip
    assert bad.exit_code == 2 and "num_labels" in bad.output
    res = runner.invoke(app, ["train", "unet-seg", "--data", str(fashion), "--num-labels", "2", "--out",
                              str(tmp_path / "useg"), "--set", "segmenter.train.max_steps=2",
                              "--set", "segmenter.widths=[4,8]",
                              "--set", "segmenter.train.batch_size=2", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "useg" / "final" / "model.safetensors").is_file()


# ------------------------------------------------------------------------ DatasetDDPM and the segmenter
def test_dataset_ddpm_filters_uncertain_and_trains_segmenter(tmp_path, tiny_sd, fashion):
    from diffuseg.methods.dataset_ddpm import UNetSegmenterPipeline, generate_dataset_ddpm, train_segmenter
    from diffuseg.train import TrainConfig
    from diffuseg.train.ddpm_seg import load_labelled, select_labelled

    model, _ = tiny_sd
    ids = select_labelled(fashion, 3, seed=0)
    images, labels = load_labelled(fashion, ids)
    src = DiffusionFeatures(["up_blocks.2", "up_blocks.3"], [50], backbone=model)
    names = json.loads((fashion / "meta.json").read_text())["classes"]
    pipe = fit_ddpm_seg(images, labels, names, src, _fast(num_models=2, max_iterations=20), progress=False)
    out = generate_dataset_ddpm(pipe, tmp_path / "syn", 5, drop_fraction=0.2, batch_size=2,
                                num_inference_steps=2, progress=False)  # fmt: skip
    recs = [json.loads(line) for line in (out / "uncertainty.jsonl").read_text().splitlines()]
    kept = [r["uncertainty"] for r in recs if r["kept"]]
    dropped = [r["uncertainty"] for r in recs if not r["kept"]]
    assert len(kept) == 4 and len(dropped) == 1 and max(kept) <= min(dropped)
    assert len(list((out / "ann_dir" / "train").glob("*.png"))) == 4
    assert json.loads((out / "meta.json").read_text())["classes"] == names
    with pytest.raises(FileExistsError):
        generate_dataset_ddpm(pipe, out, 2, progress=False)

    syn_ids = select_labelled(out, 4, seed=0)
    syn_images, syn_labels = load_labelled(out, syn_ids)
    cfg = TrainConfig(output_dir=str(tmp_path / "seg"), max_steps=3, batch_size=2, lr=1e-3, progress=False,
                      checkpoint_every=3, log_every=1)  # fmt: skip
    result = train_segmenter(syn_images, syn_labels, names, cfg, size=64, widths=(4, 8))
    assert result.finished and result.export_dir is not None
    seg = UNetSegmenterPipeline.from_pretrained(result.export_dir)
    pred = seg(images[:2], output_size=32)
    assert pred.labels.shape == (2, 32, 32) and pred.scores.shape == (2, len(names), 32, 32)
