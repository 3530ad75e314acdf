"""The browser demo: the session logic on a real (tiny) pipeline, and the gradio app served on loopback."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from diffuseg.demo import EXAMPLES_DIR, DemoSession, available_methods, build_demo
from diffuseg.io import list_images, read_image


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    from diffuseg.backbones.presets import tiny_sd_backbone

    folder = tmp_path_factory.mktemp("demo") / "sd"
    tiny_sd_backbone(folder.parent).save_pretrained(folder)
    return str(folder)


def test_session_segments_with_a_real_pipeline_and_loads_it_once(tiny_backbone: str) -> None:
    from diffuseg.methods import load_pipeline

    loads = []

    def loader(method, source):
        loads.append((method, source))
        return load_pipeline(method, source)

    session = DemoSession({"diffseg": tiny_backbone}, loader=loader)
    image = read_image(list_images(EXAMPLES_DIR)[0])
    r = session.run(image, "diffseg", "")
    assert r.labels.ndim == 2 and r.overlay.ndim == 3 and r.overlay.shape[1] > r.labels.shape[1]
    assert r.class_names[0] == "segment 0" and "segments (unsupervised ids)" in r.report
    shares = [float(line.split("|")[2].strip(" %")) for line in r.report.splitlines()[4:]]
    assert sum(shares) == pytest.approx(100.0, abs=0.5)

    named = session.run(np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]), "diffseg", "bag, grass")
    assert named.class_names == ["bag", "grass"] and set(np.unique(named.labels)) <= {0, 1}
    assert loads == [("diffseg", tiny_backbone)]


def test_session_errors_say_what_to_do(tiny_backbone: str) -> None:
    session = DemoSession({"diffseg": tiny_backbone, "esda": "nowhere"}, loader=lambda m, s: None)
    with pytest.raises(ValueError, match="upload an image"):
        session.run(None, "diffseg")
    with pytest.raises(ValueError, match="type them, comma-separated"):
        session.run(np.zeros((32, 32, 3), np.uint8), "esda", " ")
    with pytest.raises(ValueError, match="not loaded in this demo"):
        session.run(np.zeros((32, 32, 3), np.uint8), "zs3d", "a, b")
    with pytest.raises(ValueError, match="too small"):
        session.run(np.zeros((4, 4, 3), np.uint8), "diffseg")
    with pytest.raises(ValueError, match="--checkpoint METHOD=FOLDER"):
        DemoSession({})
    with pytest.raises(ValueError, match="unknown methods"):
        DemoSession({"nope": None})


def test_available_methods_uses_given_and_shipped(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "esda").mkdir()
    (tmp_path / "esda" / "config.json").write_text("{}")
    monkeypatch.setenv("DIFFUSEG_CHECKPOINTS", str(tmp_path))
    assert available_methods({"diffseg": "/models/sd"}) == {"diffseg": "/models/sd", "esda": None}


def test_gradio_app_serves_segmentations_on_loopback(tiny_backbone: str) -> None:
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(DemoSession({"diffseg": tiny_backbone}))
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        overlay_path, uncertainty, report = client.predict(
            handle_file(str(list_images(EXAMPLES_DIR)[0])), "diffseg", "", api_name="/segment"
        )
        assert read_image(overlay_path).shape[0] >= 256
        assert uncertainty is None and report.startswith("**diffseg**")
    finally:
        demo.close()
