"""Carry packs: a run checkpoint made compact for committing, laid out again, and resumed elsewhere."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffuseg.train import TrainConfig, latest_checkpoint, train
from diffuseg.train.carry import PACK_FILE, pack_run, unpack_run

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_tiny_train_task", REPO / "tests" / "_tiny_train_task.py")
tiny = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(tiny)  # type: ignore[union-attr]


def _config(out: Path, max_steps: int) -> TrainConfig:
    return TrainConfig(
        output_dir=str(out),
        max_steps=max_steps,
        batch_size=8,
        lr=1e-2,
        log_every=1,
        progress=False,
        ema_decay=0.9,
        checkpoint_every=4,
        warmup_steps=2,
        lr_schedule="cosine",
    )


def test_pack_is_compact_and_a_carried_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    straight = tiny.TinyTask()
    train(straight, _config(tmp_path / "straight", 12))

    first_dir = tmp_path / "machine_a"
    train(tiny.TinyTask(), _config(first_dir, 12))  # keeps checkpoints 8 and 12: carry step 8
    (first_dir / "probe.json").write_text('{"miou": 1.0}')
    (first_dir / "latent_cache").mkdir()
    (first_dir / "latent_cache" / "big.npy").write_bytes(b"x" * 10)
    pack = pack_run(
        first_dir, tmp_path / "repo" / "state", checkpoint=first_dir / "checkpoints" / "step_000008"
    )
    meta = json.loads((pack / PACK_FILE).read_text())
    assert meta["step"] == 8 and meta["checkpoint"] == "step_000008"
    assert (pack / "probe.json").is_file() and not (pack / "latent_cache").exists()

    ckpt = pack / "checkpoints" / "step_000008"
    assert all(v.dtype == torch.float16 for v in load_file(ckpt / "model.safetensors").values())
    assert all(v.dtype == torch.float16 for v in load_file(ckpt / "ema.safetensors").values())
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    moments = [v for s in opt["state"].values() for k, v in s.items() if k != "step"]
    steps = [v for s in opt["state"].values() for k, v in s.items() if k == "step"]
    assert moments and all(v.dtype == torch.bfloat16 for v in moments)
    assert all(v.dtype == torch.float32 and float(v) == 8 for v in steps)

    # Machine B: a fresh folder, the pack unpacked, the same command resumes at step 8 and finishes.
    shutil.rmtree(first_dir)
    second_dir = tmp_path / "machine_b"
    unpacked = unpack_run(pack, second_dir)
    assert latest_checkpoint(second_dir) == unpacked
    resumed = tiny.TinyTask()
    result = train(resumed, _config(second_dir, 12))
    assert result.finished and result.step == 12
    log = [json.loads(line) for line in (second_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in log if r["kind"] == "session"] == [0, 8]  # machine A's record travelled
    # Equal to the uninterrupted run up to the float16 / bfloat16 rounding of the hand-over.
    for a, b in zip(straight.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.allclose(a, b, atol=2e-3, rtol=0), (a - b).abs().max()

    # The pack never overwrites newer work without being asked.
    with pytest.raises(FileExistsError, match="resume it directly"):
        unpack_run(pack, second_dir)
    unpack_run(pack, second_dir, overwrite=True)
    assert latest_checkpoint(second_dir).name == "step_000008"


def test_pack_and_unpack_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        pack_run(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a carry pack"):
        unpack_run(tmp_path, tmp_path / "run")


def test_cli_pack_then_unpack(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from diffuseg.cli import app

    run = tmp_path / "run"
    train(tiny.TinyTask(), _config(run, 4))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "pack", str(run), "--out", str(tmp_path / "pack"), "-q"])
    assert res.exit_code == 0, res.output
    assert "MiB" in res.output
    res = runner.invoke(app, ["train", "unpack", str(tmp_path / "pack"), "--out", str(run), "-q"])
    assert res.exit_code == 2 and "resume it directly" in res.output
    res = runner.invoke(app, ["train", "unpack", str(tmp_path / "pack"), "--out", str(tmp_path / "b"), "-q"])
    assert res.exit_code == 0, res.output
    assert latest_checkpoint(tmp_path / "b").name == "step_000004"
    res = runner.invoke(
        app, ["train", "pack", str(tmp_path / "nothing"), "--out", str(tmp_path / "p2"), "-q"]
    )
    assert res.exit_code == 2 and "no complete checkpoint" in res.output


@pytest.mark.skipif(shutil.which("diffuseg") is None, reason="the diffuseg console script is not installed")
def test_carry_script_carries_a_stage_with_its_own_loop(tmp_path: Path) -> None:
    """``scripts/carry.sh``: RUN/STAGE (ZS3D's calibration model) travels as NAME.STAGE and comes back."""
    import os
    import subprocess

    runs, state = tmp_path / "runs", tmp_path / "state"
    train(tiny.TinyTask(), _config(runs / "zs3d", 4))
    train(tiny.TinyTask(), _config(runs / "zs3d" / "calibration", 8))
    (runs / "zs3d" / "calibration.json").write_text('{"gamma": 0.1}')
    env = {**os.environ, "RUNS": str(runs), "STATE": str(state)}

    def carry(*args: str) -> None:
        res = subprocess.run(
            ["bash", str(REPO / "scripts" / "carry.sh"), *args], env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr

    carry("pack", "zs3d")
    assert json.loads((state / "zs3d" / PACK_FILE).read_text())["step"] == 4
    assert json.loads((state / "zs3d.calibration" / PACK_FILE).read_text())["step"] == 8
    assert (runs / "zs3d" / ".train.lock").is_file() and not (state / "zs3d" / ".train.lock").exists()
    shutil.rmtree(runs)
    carry("unpack", "zs3d")
    assert latest_checkpoint(runs / "zs3d").name == "step_000004"
    assert latest_checkpoint(runs / "zs3d" / "calibration").name == "step_000008"
    assert (runs / "zs3d" / "calibration.json").read_text() == '{"gamma": 0.1}'
    carry("unpack", "zs3d")  # already laid out: nothing replaced, no error
