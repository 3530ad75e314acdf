"""The command line end to end on small real data: data generation, scoring, help, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from diffuseg.cli import app
from diffuseg.io import read_label, write_label

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "fashion_scenes"


def test_help_lists_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("data", "train", "generate", "segment", "evaluate", "evaluate-predictions"):
        assert cmd in res.output
    res = runner.invoke(app, ["train", "--help"])
    assert "vae" in res.output and "mini-sd" in res.output


def test_data_fashion_scenes_then_score_ground_truth(tmp_path):
    out = tmp_path / "fs"
    res = runner.invoke(
        app,
        [
            "data",
            "fashion-scenes",
            "--out",
            str(out),
            "--num-train",
            "3",
            "--num-val",
            "4",
            "--seed",
            "1",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"][0] == "background" and meta["unseen"] == ["sandal", "coat"]
    assert len(list((out / "ann_dir" / "val").glob("*.png"))) == 4
    # perfect predictions score 100
    res = runner.invoke(
        app,
        [
            "evaluate-predictions",
            "--pred-dir",
            str(out / "ann_dir" / "val"),
            "--data",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert (
        report["num_images"] == 4
        and report["metrics"]["mIoU"] == 100.0
        and report["metrics"]["aAcc"] == 100.0
    )
    # generating again into the same folder refuses without --overwrite
    res = runner.invoke(
        app, ["data", "fashion-scenes", "--out", str(out), "--num-train", "1", "--num-val", "1", "-q"]
    )
    assert res.exit_code == 2 and "error" in res.output


def test_evaluate_predictions_unsupervised_and_missing(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    pred = tmp_path / "pred"
    for f in sorted((data / "ann_dir" / "val").glob("*.png")):
        lab = read_label(f)
        perm = np.where(lab == 255, 0, (lab + 3) % 11)  # renamed ids: Hungarian matching must undo it
        write_label(pred / f.name, perm)
    res = runner.invoke(
        app,
        [
            "evaluate-predictions",
            "--pred-dir",
            str(pred),
            "--data",
            str(data),
            "--unsupervised",
            "--json",
            str(tmp_path / "u.json"),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "u.json").read_text())
    assert report["protocol"]["matching"] == "per_image" and report["metrics"]["mIoU"] == 100.0
    next(pred.glob("*.png")).unlink()
    res = runner.invoke(app, ["evaluate-predictions", "--pred-dir", str(pred), "--data", str(data), "-q"])
    assert res.exit_code == 2 and "missing" in res.output.lower()


def test_missing_default_backbone_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSEG_CHECKPOINTS", str(tmp_path))
    res = runner.invoke(
        app, ["segment", str(EXAMPLES / "img_dir" / "val"), "--out", str(tmp_path / "o"), "-q"]
    )
    assert res.exit_code == 2 and "DIFFUSEG_CHECKPOINTS" in res.output


def test_data_convert_errors(tmp_path):
    res = runner.invoke(
        app,
        ["data", "convert", "voc2012", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "-q"],
    )
    assert res.exit_code == 2 and "error" in res.output
    res = runner.invoke(
        app,
        [
            "data",
            "convert",
            "voc2012",
            "--src",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--split-list",
            "nonsense",
            "-q",
        ],
    )
    assert res.exit_code == 2 and "SPLIT=FILE" in res.output


def test_info_lists_methods_and_checkpoints(tmp_path, monkeypatch):
    (tmp_path / "mini-sd-vae").mkdir()
    monkeypatch.setenv("DIFFUSEG_CHECKPOINTS", str(tmp_path))
    res = runner.invoke(app, ["info"])
    assert res.exit_code == 0
    report = json.loads(res.output)
    assert "diffseg" in report["methods"] and "zs3d" in report["methods"]
    assert report["shipped_checkpoints"] == ["mini-sd-vae"]


def test_generate_writes_a_grid(tmp_path):
    from diffuseg.backbones.presets import tiny_sd_backbone
    from diffuseg.io import read_image

    tiny_sd_backbone(tmp_path).save_pretrained(tmp_path / "sd")
    out = tmp_path / "g.png"
    res = runner.invoke(
        app,
        [
            "generate",
            "--backbone",
            str(tmp_path / "sd"),
            "--prompt",
            "a red bag",
            "--prompt",
            "a sandal",
            "--num-samples",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    grid = read_image(out)
    assert grid.shape[0] > 128 and grid.shape[1] > 2 * 128  # 2 prompts x 2 samples of 128 px
    res = runner.invoke(
        app, ["generate", "--backbone", str(tmp_path / "nope"), "--prompt", "x", "--out", str(out)]
    )
    assert res.exit_code == 2
