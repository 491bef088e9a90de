"""runtime/ (and serve/) ship without torch: they must import and generate with torch unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_runs_without_torch(tiny_dir, wan_artifacts, tmp_path):
    """Both families: the seed's tiny model, a released-layout TI2V model with an image, and
    Wan2.1 I2V (CLIP preprocessing, the streaming encoder) held --low-memory."""
    code = textwrap.dedent(f"""
        import sys, importlib.abc

        BLOCKED = ("torch", "diffusers", "transformers")

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(name + " is blocked in this test")

        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        import runtime, runtime.cli, runtime.job, runtime.media, runtime.pipeline, runtime.seed, runtime.wan
        import serve.cli, serve.client, serve.protocol, serve.repository, serve.server  # serving too
        pipe = runtime.Pipeline.from_dir({str(tiny_dir)!r})
        frames = pipe(np.zeros((64, 64, 3), np.uint8), frames=5, steps=2)
        runtime.media.write_video(frames, {str(tmp_path / "x.mp4")!r})
        assert frames.shape == (5, 64, 64, 3), frames.shape
        wan = runtime.Pipeline.from_dir({str(wan_artifacts("wan2.2"))!r})
        frames = wan(prompt="a cat", image=np.zeros((64, 64, 3), np.uint8), frames=5, height=64, width=64,
                     steps=2)
        assert frames.shape == (5, 64, 64, 3), frames.shape
        i2v = runtime.Pipeline.from_dir({str(wan_artifacts("wan2.1-i2v"))!r}, low_memory=True)
        frames = i2v(prompt="a cat", image=np.zeros((40, 24, 3), np.uint8), frames=5, height=32, width=32,
                     steps=2)
        assert frames.shape == (5, 32, 32, 3), frames.shape
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_no_torch_import_in_runtime_sources():
    from pathlib import Path

    import runtime
    import serve

    for path in [*Path(runtime.__file__).parent.rglob("*.py"), *Path(serve.__file__).parent.rglob("*.py")]:
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path
