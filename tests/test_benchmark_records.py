"""Committed benchmark records: one expensive cell's result, reused only under the same signature."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("_bench_common", REPO / "benchmarks" / "_common.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules.setdefault("_bench_common", module)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _dataset(root: Path, n_train: int) -> Path:
    (root / "img_dir" / "train").mkdir(parents=True)
    (root / "img_dir" / "val").mkdir(parents=True)
    for i in range(n_train):
        (root / "img_dir" / "train" / f"{i}.png").write_bytes(b"")
    (root / "img_dir" / "val" / "0.png").write_bytes(b"")
    meta = {"name": "FS", "classes": ["background", "a"], "unseen": ["a"], "generator": {"seed": 0}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def test_record_round_trip_and_signature_mismatch(common, tmp_path: Path) -> None:
    a = common.dataset_fingerprint(_dataset(tmp_path / "a", 3))
    b = common.dataset_fingerprint(_dataset(tmp_path / "elsewhere", 3))
    c = common.dataset_fingerprint(_dataset(tmp_path / "c", 4))
    assert a == b != c  # the path does not matter, the content does
    assert a["splits"] == {"train": 3, "val": 1}

    sig = {"config": {"lr": 1e-3, "steps": (1, 2)}, "data": a}
    root = tmp_path / "records"
    assert common.load_record("bench", "fold0_esda", sig, root) is None
    path = common.save_record("bench", "fold0_esda", sig, {"metrics": {"mIoU": 12.5}}, root)
    assert path == root / "bench" / "fold0_esda.json"
    assert common.load_record("bench", "fold0_esda", sig, root) == {"metrics": {"mIoU": 12.5}}
    assert common.load_record("bench", "fold0_esda", {**sig, "data": c}, root) is None
    assert common.load_record("bench", "fold0_esda", {**sig, "config": {"lr": 2e-3}}, root) is None
    saved = json.loads(path.read_text())
    assert {"date", "machine"} <= set(saved)
    with pytest.raises(ValueError, match="plain file names"):
        common.save_record("bench", "../x", sig, {}, root)


def test_model_fingerprint_follows_the_weights_not_the_path(common, tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "unet", tmp_path / "b" / "unet"
    for folder in (a, b):
        folder.mkdir(parents=True)
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights-1")
        (folder / "config.json").write_text("{}")
    fa, fb = common.model_fingerprint(a.parent), common.model_fingerprint(b.parent)
    assert fa == fb and fa.startswith("sha256:")
    (b / "diffusion_pytorch_model.safetensors").write_bytes(b"weights-2")  # retrained in place
    assert common.model_fingerprint(b.parent) != fa
    assert common.model_fingerprint("random:mini-sd") == "random:mini-sd"
    assert common.model_fingerprint(None, default=a.parent) == fa  # None -> the shipped default
    assert common.record_key("ddpm+aug", "n10", "s0", "") == "ddpm-aug_n10_s0"
    assert common.record_key("sweep", "n10", "s0", "up1+up2@50,150") == "sweep_n10_s0_up1-up2-50-150"


def _load_benchmark(script: str):
    sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import their helpers as `_common`
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{script}", REPO / "benchmarks" / script)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


@pytest.fixture(scope="module")
def ddpmseg_bench():
    return _load_benchmark("ddpmseg_fashion.py")


def test_ddpmseg_targets_are_judged_on_means_and_flag_noise(ddpmseg_bench) -> None:
    cells = {"ddpm": [9.0, 9.2, 8.8], "rgbxy": [8.0, 8.1, 7.9], "random": [8.6, 9.4, 8.5], "effnet": [12.0]}
    done = {(row, 10, s): {"mIoU": v} for row, vals in cells.items() for s, v in enumerate(vals)}
    lines = ddpmseg_bench.target_lines(done, [5, 10], [0, 1, 2])
    floor, control, effnet, unet = lines[:4]
    assert floor.endswith("N=5 not run, N=10 9.0 vs 8.0: holds")
    assert control.endswith("N=10 9.0 vs 8.8: holds (within the seeds' spread)")
    assert effnet.endswith("9.0 vs 12.0: missed (seed 0 only)") and unet.endswith("not run")


def test_ddpmseg_grid_ceiling_falls_with_the_grid(ddpmseg_bench) -> None:
    labels = np.zeros((2, 64, 64), dtype=np.uint8)
    labels[:, ::8, :] = 1  # thin stripes: invisible to a coarse grid
    labels[:, 40:60, 40:60] = 2
    bench = SimpleNamespace(meta={"classes": ["bg", "stripe", "box"], "ignore_index": 255, "name": "t"},
                            val_labels=labels)  # fmt: skip
    ceil = ddpmseg_bench.grid_ceiling(bench, (4, 16, 64))
    assert ceil[64] == pytest.approx(100.0)
    assert ceil[4] < ceil[16] < 100.0


def test_ddpmseg_cells_say_how_many_seeds_they_average(ddpmseg_bench) -> None:
    assert ddpmseg_bench.seed_cell([], 3) == "-"
    assert ddpmseg_bench.seed_cell([10.0, 12.0, 11.0], 3) == "11.0 ± 1.0"
    assert ddpmseg_bench.seed_cell([10.0, 12.0], 3) == "11.0 ± 1.4 (2/3 seeds)"
    assert ddpmseg_bench.seed_cell([9.25], 3) == "9.2 (1/3 seeds)"


def test_ddpmseg_tta_view_tables_read_views_and_the_tta_row(ddpmseg_bench) -> None:
    tta = ddpmseg_bench.TTA_ROW
    assert ddpmseg_bench.tta_view_tables({}, {("view-grey", 10, 0): None}, [10], [0, 1]) == []
    rec = {"mIoU": 8.4, "foreground_IoU": 24.0}
    views = {("view-grey", 10, 0): rec, ("view-grey", 10, 1): {"mIoU": 8.6, "foreground_IoU": 26.0}}
    done = {(tta, 10, 0): {"mIoU": 8.8, "foreground_IoU": 29.0}}
    done[tta, 10, 2] = {"mIoU": 1.0, "foreground_IoU": 1.0}  # no views at seed 2: left out
    lines = ddpmseg_bench.tta_view_tables(done, views, [5, 10], [0, 1, 2])
    text = "\n".join(lines)
    assert "| view 'grey' alone | - | 8.5 ± 0.1 (2/3 seeds) |" in text
    assert "| view 'grey' alone | - | 25.0 ± 1.4 (2/3 seeds) |" in text  # the foreground-IoU table
    # the TTA row is read on the seeds with views (0, 1), not on seed 2
    assert "vote of all 5 (+ TTA (5 views, majority vote)) | - | 8.8 (1/3 seeds) |" in text
    assert "| view 'identity' alone | - | - |" in text  # not recorded yet
    # every tag recorded by --tta-views has a row in both tables
    assert text.count("(soft vote) |") == 2 == text.count("other than 'grey'")


def test_ddpmseg_cached_view_predictions_match_the_pipelines_tta(ddpmseg_bench, tmp_path: Path) -> None:
    """The benchmark scores TTA from per-view feature stores; that must be what ``pipe(tta=True)`` does."""
    import torch

    from diffuseg.methods.ddpm_seg import TTA_VIEWS, FeatureConfig, RGBXYFeatures
    from diffuseg.train.ddpm_seg import EnsembleTrainConfig, build_feature_store, fit_ddpm_seg

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(3)]
    labels = [(im[..., 0] > 128).astype(np.int64) for im in images]
    cfg = EnsembleTrainConfig(num_models=2, max_iterations=40, stop_after_epoch=0, patience=1000)
    torch.manual_seed(0)
    pipe = fit_ddpm_seg(images, labels, ["dark", "red"], FeatureConfig(kind="rgbxy", resolution=24), cfg,
                        progress=False)  # fmt: skip
    src = RGBXYFeatures(24)
    stores = {
        v: build_feature_store(
            ddpmseg_bench._ViewSource(src, v), images, None, tmp_path / v, fingerprint=v, progress=False
        )  # fmt: skip
        for v in TTA_VIEWS
    }
    bench = object.__new__(ddpmseg_bench.Bench)
    bench.val_images, bench.val_labels = images, np.stack(labels)
    want = pipe(images, tta=True).labels
    assert np.array_equal(bench.predict_store(pipe, stores), want)
    per_view = bench.view_predictions(pipe, stores)
    assert per_view["grey"][0].shape == (3, 24, 24)
    assert not torch.equal(per_view["grey"][0], per_view["identity"][0])  # the views do disagree


class _AxisText:
    """Text encoder stub: every name gets a fixed 2-d direction, so nearest names are known."""

    def __init__(self, angles: dict[str, float]) -> None:
        self.angles = angles

    def encode_classes(self, names, templates=None):
        import torch

        a = torch.tensor([self.angles[n] for n in names])
        return torch.stack([a.cos(), a.sin()], dim=1)


def test_esda_per_class_table_uses_only_the_folds_base_names() -> None:
    esda = _load_benchmark("esda_fashion.py")
    names = [n for fold in esda.FASHION_SCENES_FOLDS for n in fold]
    angles = {n: 0.3 * i for i, n in enumerate(names)}
    angles["shirt"] = angles["t-shirt"] + 0.01  # nearest of all, but not its own fold mate
    angles["sneaker"] = angles["shirt"] + 0.02  # fold 3: sneaker may not fall back on shirt
    nearest = esda.nearest_base_names(_AxisText(angles), None)
    assert nearest["t-shirt"][0] == "shirt" and nearest["t-shirt"][1] == pytest.approx(np.cos(0.01), abs=1e-6)
    assert nearest["shirt"][0] == "t-shirt" and nearest["sneaker"][0] == "t-shirt"

    def report(ious: dict[str, float]) -> dict:
        return {"per_class": {c: {"IoU": v} for c, v in ious.items()}}

    results = {  # variant -> fold -> seed -> report
        "esda": {
            0: {0: report({"t-shirt": 50.0, "trouser": 5.0}), 1: report({"t-shirt": 54.0, "trouser": 7.0})},
            3: {0: report({"shirt": 40.0, "sneaker": 30.0})},
        },
        "clsclip": {
            0: {0: report({"t-shirt": 40.0, "trouser": 30.0})},
            3: {0: report({"shirt": 40.0, "sneaker": 20.0})},
        },
        "no-adapters": {1: {0: report({"pullover": 1.0, "dress": 1.0})}},  # no baseline: not in the table
    }
    rows, corr = esda.per_class_rows(results, nearest)
    assert [r[0] for r in rows] == ["t-shirt", "trouser", "shirt", "sneaker"]
    # the mean over seeds: t-shirt (50 + 54) / 2 - 40, trouser (5 + 7) / 2 - 30
    assert rows[0][2].startswith("shirt (") and rows[0][5] == "+12.0" and rows[1][5] == "-24.0"
    assert corr.startswith("Spearman") and "over 4 classes" in corr
    assert esda.per_class_rows({"esda": results["esda"]}, nearest) == ([], "")


def test_esda_name_diagnostics_count_where_the_mask_lands(tmp_path: Path) -> None:
    from diffuseg.io import write_json, write_label

    esda = _load_benchmark("esda_fashion.py")
    label = np.zeros((4, 4), np.uint8)
    label[0, :] = 5  # novel
    label[1, :] = 7  # nearest base
    label[2, :2] = 1  # another object
    label[3, 3] = 255
    a = np.ones((4, 4), np.uint8)  # the novel name's mask covers everything
    b = np.zeros((4, 4), np.uint8)
    b[0, :2] = 1
    counts = esda.name_dependence_counts(label, a, b, 5, 7)
    assert counts.tolist() == [4, 4, 2, 5, 2, 16]  # background: 2 + 3 valid pixels; ignore left out

    # the name-blind floor: every object's true pixels scored on the fold's episodes
    classes = ["background", "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "ankle boot"]  # fmt: skip
    first = np.zeros((32, 32), np.uint8)
    first[0:10, 0:10] = 5  # coat, 100 px
    first[20:30, 20:30] = 1  # t-shirt, 100 px: the floor's mask covers it too
    second = np.zeros((32, 32), np.uint8)
    second[4:12, 4:12] = 6  # sandal alone
    for i, lab in enumerate((first, second)):
        write_label(tmp_path / "ann_dir" / "val" / f"{i:04d}.png", lab)
    write_json(tmp_path / "meta.json", {"name": "FashionScenes", "classes": classes, "unseen": []})
    floor = esda.name_blind_floor(tmp_path, 2, 2)
    assert floor["per_class"]["coat"]["IoU"] == pytest.approx(50.0)
    assert floor["per_class"]["sandal"]["IoU"] == pytest.approx(100.0)
    assert floor["metrics"]["mIoU"] == pytest.approx(75.0)


def test_esda_table_averages_seeds_and_shows_the_spread_of_the_fold_mean(tmp_path: Path) -> None:
    esda = _load_benchmark("esda_fashion.py")
    assert esda.cell_name("esda") == "esda" and esda.cell_name("esda", seed=2) == "esda-seed2"
    assert esda.cell_name("clsclip", "noise", 1) == "clsclip@noise-seed1"
    config = {"model": {"lr": 1}, "train": {"seed": 0, "max_steps": 5}}
    assert esda.seed_config(config, 0) == config  # seed 0 records keep their signature
    assert esda.seed_config(config, 3)["train"] == {"seed": 3, "max_steps": 5}
    assert config["train"]["seed"] == 0  # not changed in place
    with pytest.raises(SystemExit, match="--seeds"):
        esda.parse_args(["--seeds", "0,x"])
    with pytest.raises(SystemExit, match="use --seeds S"):  # it would be overridden silently
        esda.parse_args(["--set", "train.seed=3"])

    def report(miou: float) -> dict:
        return {"metrics": {"mIoU": miou, "FB-IoU": 50.0 + miou / 10}, "train_seconds": 60.0}

    results = {  # ESDA: seeds 0 and 1 on every fold (five-fold means 22 and 28); baseline: seed 0 only
        "esda": {f: {0: report(20.0 + f), 1: report(30.0 - f)} for f in range(5)},
        "clsclip": {f: {0: report(33.0)} for f in range(5)},
    }
    args = esda.parse_args(["--seeds", "0,1", "--data", str(tmp_path)])
    config = {
        "model": {"encoder": "e", "text_encoder": "minilm", "image_size": 128, "dim": 8},
        "train": {"max_steps": 5, "batch_size": 2, "lr": 1e-3, "lr_schedule": "cosine", "seed": 0},
        "data": {"negative_prob": 0.0},
    }
    body = esda.render(args, tmp_path, results, config, 1.0)

    def table_row(start: str) -> list[str]:
        row = next(line for line in body.splitlines() if line.startswith(start))
        return [c.strip() for c in row.strip("|").split("|")]

    cells = table_row("| ESDA |")
    assert cells[1:6] == ["25.0"] * 5  # fold cells: the mean over the two seeds
    assert cells[6] == "25.0 ± 4.2" and cells[7] == "2"  # std of (22, 28) with ddof 1
    base = table_row("| ClsCLIP")
    assert base[6] == "33.0" and base[7] == "1"  # one seed: no spread
    per_seed = body.split("**Five-fold mean mIoU per seed**")[1].split("\n\n")[1].splitlines()
    # five-fold mean per seed: (20+21+22+23+24)/5, (30+29+28+27+26)/5; the one-seed baseline is left out
    assert per_seed == ["| variant | seed 0 | seed 1 |", "|---|---|---|", "| ESDA | 22.0 | 28.0 |"]
    assert "over 15 models" in body


def test_diffseg_attention_sharpening_is_a_softmax_temperature() -> None:
    bench = _load_benchmark("diffseg_fashion.py")
    logits = torch.randn(2, 16, 16, dtype=torch.float64)
    maps = {4: logits.softmax(-1).float()}
    assert torch.allclose(bench.sharpen(maps, 1.0)[4], maps[4], atol=1e-6)
    assert torch.allclose(bench.sharpen(maps, 3.0)[4], (3 * logits).softmax(-1).float(), atol=1e-5)
    flat, sharp = (bench.normalised_entropy(bench.sharpen(maps, p)[4]) for p in (1.0, 4.0))
    assert 0 < sharp < flat < 1
    assert bench.normalised_entropy(torch.full((1, 8, 8), 1 / 8)) == pytest.approx(1.0)
    assert bench.normalised_entropy(torch.eye(8)[None]) == pytest.approx(0.0, abs=1e-6)


def test_esda_calibration_sweep_shifts_the_log_odds_and_tabulates_the_oracle(tmp_path: Path) -> None:
    from diffuseg.io import write_image, write_json, write_label

    esda = _load_benchmark("esda_fashion.py")
    classes = ["background", "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "ankle boot"]  # fmt: skip
    for i, (cls, box) in enumerate(((5, np.s_[0:10, 0:10]), (6, np.s_[4:12, 4:12]))):  # coat, sandal: fold 2
        label = np.zeros((32, 32), np.uint8)
        label[box] = cls
        write_label(tmp_path / "ann_dir" / "val" / f"{i:04d}.png", label)
        image = np.zeros((32, 32, 3), np.uint8)
        image[box] = 200  # the fake model reads the object off the image
        write_image(tmp_path / "img_dir" / "val" / f"{i:04d}.png", image)
    write_json(tmp_path / "meta.json", {"name": "FashionScenes", "classes": classes, "unseen": []})

    class UnderConfident:  # p = 0.4 on the object, 0.1 elsewhere: nothing at the 0.5 threshold
        def __call__(self, images, class_names, mode):
            p = np.where(np.stack([im[..., 0] > 0 for im in images]), 0.4, 0.1).astype(np.float32)
            return SimpleNamespace(scores=np.stack([1 - p, p], 1))

    sweep = esda.bias_sweep(UnderConfident(), tmp_path, 2, (-1.0, 0.0, 1.0, 3.0), 2)
    # logit(0.4) = -0.41, logit(0.1) = -2.2: b = 1 takes the object alone, b = 3 everything
    assert [round(sweep[b]["mIoU"], 1) for b in ("-1", "+0", "+1", "+3")] == [
        0.0,
        0.0,
        100.0,
        8.0,
    ]  # (100 + 64) / 1024 px: 9.8, 6.2
    found = {(2, "esda", 0): sweep, (2, "clsclip", 0): {**sweep, "+1": {"mIoU": 50.0, "FB-IoU": 0.0}}}
    body = "\n".join(esda.calibration_section(found, 2))
    assert "| 2 | ESDA | 0.0 | 0.0 | 100.0 | 8.0 | 100.0 (b = +1) |" in body
    assert "| ClsCLIP-like baseline | 0.0 | 0.0 | 50.0 | 8.0 | 50.0 |" in body
    assert esda.calibration_section({}, 2) == []


def test_alignment_probe_maps_names_to_classifiers() -> None:
    probe = _load_benchmark("alignment_probe.py")
    names = probe.load_imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 999  # "crane" is a bird and a machine
    assert names[0].startswith("tench") and any(n.split(",")[0] == "sandal" for n in names)
    g = torch.Generator().manual_seed(0)
    text, true_map = torch.randn(200, 6, generator=g), torch.randn(7, 5, generator=g)
    weights = torch.cat([text, torch.ones(200, 1)], 1) @ true_map  # (200, 4 + bias)
    new = torch.randn(3, 6, generator=g)
    fitted = probe.ridge_classifiers(text, weights, new, lam=1e-6)
    assert torch.allclose(fitted, torch.cat([new, torch.ones(3, 1)], 1) @ true_map, atol=1e-3)
    # a sharp neighbour mix copies the classifier of the closest name; a flat one averages them all
    sharp = probe.neighbour_classifiers(text, weights, text[:2] * 3.0, tau=1e-3)
    assert torch.allclose(sharp, weights[:2], atol=1e-4)
    assert torch.allclose(
        probe.neighbour_classifiers(text, weights, new, tau=1e6), weights.mean(0).expand(3, -1), atol=1e-4
    )
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    clf = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # class 8 reads dim 1, class 9 dim 0
    assert probe.accuracy(feats, clf, torch.tensor([9, 8]), [8, 9]) == 1.0
