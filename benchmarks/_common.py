"""Helpers shared by the benchmark scripts: provenance lines and docs/results.md sections.

Every table in docs/results.md is written by a script here, between HTML-comment markers that
the script owns, so a rerun replaces its own section and leaves the others (and any prose
outside markers) alone. Each section records the command, date and machine that produced it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from diffuseg.io import atomic_write, weights_fingerprint

RESULTS_MD = Path(__file__).resolve().parents[1] / "docs" / "results.md"

RESULTS_HEADER = """# Results

Every table below is produced by a script in `benchmarks/`, which rewrites only its own section
(between the `<!-- BEGIN ... -->` / `<!-- END ... -->` markers; do not edit inside them by hand).
Each section states the exact command, the date and the machine it ran on, so any number here
can be reproduced by rerunning that command.

Metrics follow the evaluation contract of DESIGN.md (implemented in `diffuseg.eval`): mIoU, aAcc
and mAcc in percent with mmsegmentation semantics (intersections and unions summed over the
dataset, ignore pixels dropped, classes absent from both ground truth and prediction left out of
the mean). Unsupervised output is matched to classes with the Hungarian algorithm, per image
(DiffSeg's protocol) or once over the dataset (STEGO's); each table says which.
"""


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo; platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(threads: int | None = None) -> str:
    """One line naming the CPU, the cores available and the thread count the run used."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    import torch  # late: keeps `--help` of the scripts fast

    parts = [cpu_model(), f"{cores} cores available"]
    if threads is not None:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''} used")
    parts += [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    return ", ".join(parts)


def today() -> str:
    """The date in ISO format (UTC), for the 'date' line of a section."""
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran this script, as a user would retype it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    with contextlib.suppress(ValueError):  # a script outside the repository keeps its own path
        script = script.resolve().relative_to(RESULTS_MD.parents[1])
    return shlex.join(["python", str(script), *argv[1:]])


def mean_std(values: Sequence[float], digits: int = 1) -> str:
    """'m ± s' over seeds ('m' alone for a single value); the sample standard deviation."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; numbers should already be formatted strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _markers(section_id: str) -> tuple[str, str]:
    if not re.fullmatch(r"[a-z0-9_-]+", section_id):
        raise ValueError(f"section id must be lower-case letters, digits, '-' or '_', got {section_id!r}")
    return f"<!-- BEGIN {section_id} -->", f"<!-- END {section_id} -->"


def replace_section(text: str, section_id: str, body: str) -> str:
    """``text`` with the marked section ``section_id`` replaced by ``body`` (appended if absent)."""
    begin, end = _markers(section_id)
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_results_section(section_id: str, body: str, path: str | os.PathLike = RESULTS_MD) -> Path:
    """Replace (or add) a section of docs/results.md atomically, creating the file with its header."""
    path = Path(path)
    text = path.read_text() if path.exists() else RESULTS_HEADER
    new = replace_section(text, section_id, body)
    if not new.endswith("\n"):
        new += "\n"
    with atomic_write(path, "w") as f:
        f.write(new)
    return path


def provenance(threads: int | None = None, argv: Sequence[str] | None = None) -> str:
    """The command / date / machine lines every section starts with."""
    return "\n".join(
        [
            f"- command: `{command_line(argv)}`",
            f"- date: {today()}",
            f"- machine: {machine_info(threads)}",
        ]
    )


# ------------------------------------------------------------------------------------------ records
RECORDS_DIR = Path(__file__).resolve().parent / "records"


def dataset_fingerprint(data_dir: str | os.PathLike) -> dict[str, object]:
    """What identifies a dataset across machines (not its path): meta.json's name/classes/unseen and
    the image count of each split. Records are reused only on data with the same fingerprint."""
    import json

    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    splits = {}
    for split_dir in sorted(p for p in (data_dir / "img_dir").iterdir() if p.is_dir()):
        splits[split_dir.name] = sum(1 for _ in split_dir.iterdir())
    return {
        "name": meta.get("name"),
        "classes": meta.get("classes"),
        "unseen": meta.get("unseen"),
        "splits": splits,
        "generator": meta.get("generator"),
    }


def model_fingerprint(spec: str | os.PathLike | None, default: str | os.PathLike | None = None) -> str:
    """What identifies a model across machines: the sha256 of its weight files (not its path).

    ``spec`` is a model folder, ``None`` (then ``default``, the shipped folder) or any other string
    (a hub id, ``random:<preset>``), returned as it is. A folder's ``*.safetensors`` / ``*.bin`` files
    are hashed in sorted order, so retraining a backbone invalidates every record that used it.
    """
    target = spec if spec is not None else default
    path = Path(target) if target is not None else None
    if path is None or not path.is_dir():
        return str(target)
    return weights_fingerprint(path) or str(target)


def record_key(*parts: object) -> str:
    """A record file name from cell coordinates (``ddpm+aug``, ``up1@50,150`` -> plain characters)."""
    return "_".join(re.sub(r"[^A-Za-z0-9_.=-]+", "-", str(p)) for p in parts if str(p) != "")


def _record_path(bench: str, key: str, root: Path) -> Path:
    if not re.fullmatch(r"[a-z0-9_.-]+", bench) or not re.fullmatch(r"[A-Za-z0-9_.=-]+", key):
        raise ValueError(f"record names must be plain file names, got {bench!r}/{key!r}")
    return root / bench / f"{key}.json"


def load_record(bench: str, key: str, signature: dict, root: Path = RECORDS_DIR) -> dict | None:
    """The committed result of one expensive benchmark cell, if it was run with this exact signature.

    Benchmarks whose cells take tens of minutes each (one trained model per fold × variant) run in
    chunks across sessions on machines that are not kept; each finished cell's result is committed
    under ``benchmarks/records/`` so the next chunk skips it. A record whose signature (config, data
    fingerprint, protocol) differs is ignored, so a changed recipe always reruns.
    """
    import json

    path = _record_path(bench, key, root)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("signature") != json.loads(json.dumps(signature)):
        return None
    return saved["result"]


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write a benchmark's machine-readable result atomically, with date and machine (model cards read it)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump({"date": today(), "machine": machine_info(1), **payload}, f, indent=1, default=str)
        f.write("\n")
    return path


def save_record(bench: str, key: str, signature: dict, result: dict, root: Path = RECORDS_DIR) -> Path:
    """Write one cell's result with its signature, date and machine (atomically)."""
    import json

    path = _record_path(bench, key, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"signature": signature, "date": today(), "machine": machine_info(1), "result": result}
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    return path
