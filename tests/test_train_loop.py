"""The shared training loop: learning, resume equivalence, time box, signals, configs, two processes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffuseg.train import EMA, TrainConfig, latest_checkpoint, load_yaml_config, lr_factor, train
from diffuseg.train.loop import RunInUseError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_tiny_train_task", REPO / "tests" / "_tiny_train_task.py")
tiny = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(tiny)  # type: ignore[union-attr]


def _config(out: Path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(out), max_steps=10, batch_size=8, lr=1e-2, log_every=1, progress=False)
    return TrainConfig(**{**values, **overrides})


def _log(out: Path, kinds: tuple[str, ...] = ("train", "eval")) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] in kinds]


def _params(task) -> list[torch.Tensor]:
    return [p.detach().clone() for p in task.net.parameters()]


def test_single_process_learns_and_writes_outputs(tmp_path: Path) -> None:
    config = _config(tmp_path, max_steps=80, lr=3e-2, log_every=10, ema_decay=0.9, eval_every=40)
    config.checkpoint_every = 30
    task = tiny.TinyTask()
    result = train(task, config)

    assert result.finished and result.step == 80 and result.elapsed_s > 0
    train_lines = [r for r in _log(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == list(range(10, 81, 10))
    assert train_lines[-1]["loss"] < 0.25 * train_lines[0]["loss"]
    assert result.last_loss == pytest.approx(train_lines[-1]["loss"])
    assert {"lr", "time", "samples", "grad_norm", "noise_abs"} <= set(train_lines[0])
    assert [r["step"] for r in _log(tmp_path) if r["kind"] == "eval"] == [40, 80]

    saved = yaml.safe_load((tmp_path / "train_config.yaml").read_text())
    assert TrainConfig.from_dict(saved) == config
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000060", "step_000080"]
    assert result.checkpoint == latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000080"

    # The export holds the EMA weights; the module itself keeps the raw ones.
    exported = load_file(result.export_dir / "model.safetensors")
    ema = load_file(result.checkpoint / "ema.safetensors")
    raw = load_file(result.checkpoint / "model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert not all(torch.equal(exported[k], raw[k]) for k in raw)
    assert all(torch.equal(v, raw[k]) for k, v in task.net.state_dict().items())
    assert (tmp_path / "exports.txt").read_text() == "rank 0\n"


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    """SIGTERM mid-step (grad_accum=2), checkpoint, resume: same losses, weights, EMA and export."""
    settings = dict(max_steps=11, grad_accum=2, ema_decay=0.8, warmup_steps=3, lr_schedule="cosine")
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = tiny.TinyTask()
    assert train(straight, _config(straight_dir, **settings)).finished

    # 64 samples / batch 8 = 8 micro-batches = 4 steps per epoch: the run crosses two epoch boundaries.
    interrupted = tiny.TinyTask(interrupt_after=9)  # the signal arrives inside step 5
    first = train(interrupted, _config(resumed_dir, **settings))
    assert (first.finished, first.step) == (False, 5)
    assert first.checkpoint == resumed_dir / "checkpoints" / "step_000005"
    resumed = tiny.TinyTask()
    second = train(resumed, _config(resumed_dir, **settings))
    assert (second.finished, second.step) == (True, 11)

    for a, b in zip(_params(straight), _params(resumed), strict=True):
        assert torch.equal(a, b)
    for name in ("checkpoints/step_000011/ema.safetensors", "final/model.safetensors"):
        a, b = load_file(straight_dir / name), load_file(resumed_dir / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    drop_time = [{k: v for k, v in r.items() if k != "time"} for r in _log(straight_dir)]
    assert drop_time == [{k: v for k, v in r.items() if k != "time"} for r in _log(resumed_dir)]


def test_time_box_stops_cleanly_and_next_call_finishes(tmp_path: Path) -> None:
    config = _config(tmp_path, max_steps=6, max_minutes=1e-6, checkpoint_every=100)
    first = train(tiny.TinyTask(), config)
    assert not first.finished and first.step == 1 and first.export_dir is None
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000001"

    config.max_minutes = None
    second = train(tiny.TinyTask(), config)
    assert second.finished and second.step == 6
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3, 4, 5, 6]
    state = json.loads((second.checkpoint / "trainer_state.json").read_text())
    assert state["samples_seen"] == 6 * 8

    again = train(tiny.TinyTask(), config)  # already finished: nothing to do, export refreshed
    assert again.finished and again.step == 6 and again.last_loss is None


def test_resume_from_explicit_checkpoint_and_resume_false(tmp_path: Path) -> None:
    config = _config(tmp_path, max_steps=4, checkpoint_every=2, keep_checkpoints=5)
    train(tiny.TinyTask(), config)
    step2 = tmp_path / "checkpoints" / "step_000002"
    result = train(tiny.TinyTask(), _config(tmp_path, max_steps=3), resume_from=step2)
    assert result.step == 3
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3]
    with pytest.raises(ValueError, match="resume=False"):
        train(tiny.TinyTask(), _config(tmp_path, max_steps=4, resume=False))
    with pytest.raises(ValueError, match="not a diffuseg checkpoint"):
        train(tiny.TinyTask(), config, resume_from=tmp_path)


def test_every_call_is_logged_as_a_session_for_the_card(tmp_path: Path) -> None:
    """Chunks, a budget change half-way and a re-export: the card's history says what happened."""
    from diffuseg.train.model_card import history_section, training_history

    train(tiny.TinyTask(), _config(tmp_path, max_steps=6, max_minutes=1e-6))
    train(tiny.TinyTask(), _config(tmp_path, max_steps=4, max_minutes=5.0))  # budget cut; time box moved
    train(tiny.TinyTask(), _config(tmp_path, max_steps=4))  # finished: re-export only
    sessions = _log(tmp_path, ("session",))
    assert [s["step"] for s in sessions] == [0, 1, 4]
    assert "changed" not in sessions[0] and "changed" not in sessions[2]
    assert sessions[1]["changed"] == {"max_steps": [6, 4]}  # max_minutes is not a recipe change
    assert all(s["date"].endswith("+00:00") and s["command"] and s["processes"] == 1 for s in sessions)

    table = training_history({"main": tmp_path, "missing": tmp_path / "nope"}).splitlines()
    assert len(table) == 4  # header, separator, two sessions: the re-export trained nothing
    assert table[2].startswith("| main | 0 → 1 |") and table[2].endswith("| — |")
    assert table[3].startswith("| main | 1 → 4 |") and table[3].endswith("| max_steps 6 → 4 |")
    assert history_section(training_history({"none": tmp_path / "nope"})) == []


@pytest.mark.skipif(sys.platform == "win32", reason="flock-based lock")
def test_second_training_into_a_busy_folder_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(  # another process training into tmp_path: it holds the folder's lock
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid 4242'); f.flush(); print('locked', flush=True); time.sleep(60)",
            str(tmp_path / ".train.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match="being trained by pid 4242"):
            train(tiny.TinyTask(), _config(tmp_path, max_steps=2))
        assert not (tmp_path / "checkpoints").exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()
    assert train(tiny.TinyTask(), _config(tmp_path, max_steps=2)).finished  # free again
    assert train(tiny.TinyTask(), _config(tmp_path, max_steps=3)).step == 3  # our own lock was released


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("grad_accum", 0, "grad_accum"),
        ("lr_schedule", "linear", "lr_schedule must be one of"),
        ("ema_decay", 1.0, "ema_decay"),
        ("mixed_precision", "fp8", "mixed_precision"),
        ("max_minutes", 0, "max_minutes"),
    ],
)
def test_bad_config_raises(tmp_path: Path, field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **{field: value})


def test_dataset_smaller_than_a_batch_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(tiny.TinyTask(n=4), _config(tmp_path))


def test_lr_factor_warmup_then_cosine(tmp_path: Path) -> None:
    config = _config(tmp_path, max_steps=12, warmup_steps=2, lr_schedule="cosine")
    factors = [lr_factor(step, config) for step in range(12)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[7] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert lr_factor(5, _config(tmp_path, warmup_steps=0)) == 1.0


def test_load_yaml_config_overrides_and_types(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text("train:\n  lr: 1e-4\n  max_steps: 10\nmodel:\n  width: 32\n")
    config = load_yaml_config(path, ["train.lr=3e-3", "model.blocks=[1, 2]", "train.ema_decay=null"])
    assert config["train"] == {"lr": 3e-3, "max_steps": 10, "ema_decay": None}
    assert config["model"] == {"width": 32, "blocks": [1, 2]}
    assert isinstance(load_yaml_config(path)["train"]["lr"], float)
    assert load_yaml_config(path, {"model.width": "64"})["model"]["width"] == 64
    with pytest.raises(ValueError, match="not a section"):
        load_yaml_config(path, ["train.lr.x=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_yaml_config(path, ["train.lr"])


def test_train_config_from_dict(tmp_path: Path) -> None:
    defaults = load_yaml_config(REPO / "configs" / "train_defaults.yaml")["train"]
    assert TrainConfig.from_dict(defaults) == TrainConfig(output_dir="runs/example", max_steps=10000)
    config = TrainConfig.from_dict({"output_dir": "x", "max_steps": "5", "lr": "1e-3", "progress": "false"})
    assert (config.max_steps, config.lr, config.progress) == (5, 1e-3, False)
    with pytest.raises(ValueError, match="Unknown TrainConfig keys"):
        TrainConfig.from_dict({"output_dir": "x", "max_steps": 5, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="not a valid int"):
        TrainConfig.from_dict({"output_dir": "x", "max_steps": 2.5})


def test_ema_warmup_update_and_swap() -> None:
    net = torch.nn.Linear(2, 1)
    net.bias.requires_grad_(False)
    ema = EMA(net, decay=0.99)
    assert list(ema.shadow) == ["weight"]
    assert ema.current_decay() == pytest.approx(2 / 11)
    before = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.shadow["weight"], before + 9 / 11)
    with ema.swapped_in(net):
        assert torch.allclose(net.weight, before + 9 / 11)
    assert torch.equal(net.weight, before + 1.0)
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *args: str) -> list[dict]:
    """Run the tiny task on two CPU processes (DDP over gloo) and return each rank's report."""
    script = REPO / "tests" / "_tiny_train_task.py"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(script), str(out), *args,
    ]  # fmt: skip
    # `accelerate launch --cpu` starts a single process unless mpirun is used; `--multi_gpu` with
    # ACCELERATE_USE_CPU runs torch.distributed's launcher on CPU processes instead.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank_{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_two_processes_step_together_and_write_once(tmp_path: Path) -> None:
    # A SIGTERM to rank 1 alone must stop both ranks at the same step (no deadlock) ...
    ranks = _launch(tmp_path, "--max-steps", "10", "--interrupt-after", "3", "--interrupt-rank", "1")
    assert [(r["step"], r["finished"], r["world"]) for r in ranks] == [(3, False, 2)] * 2
    assert ranks[0]["params"] == ranks[1]["params"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000003"

    # ... and the next launch resumes, both ranks finish with identical weights, files are written once.
    ranks = _launch(tmp_path, "--max-steps", "10")
    assert [(r["step"], r["finished"]) for r in ranks] == [(10, True)] * 2
    assert ranks[0]["params"] == ranks[1]["params"]
    assert (tmp_path / "exports.txt").read_text() == "rank 0\n"
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step_000008", "step_000010"]
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "step_000010").iterdir())
    assert files == [
        "ema.safetensors", "model.safetensors", "optimizer.bin",
        "random_states_0.pkl", "random_states_1.pkl", "trainer_state.json",
    ]  # fmt: skip
    steps = [r["step"] for r in _log(tmp_path)]
    assert steps == [2, 3, 4, 6, 8, 10]
    assert _log(tmp_path)[-1]["samples"] == 10 * 8 * 2
