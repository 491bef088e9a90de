"""runtime/ ships without torch: it must import and generate with torch unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_runs_without_torch(tiny_dir, tmp_path):
    code = textwrap.dedent(f"""
        import sys, importlib.abc

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        import runtime, runtime.cli, runtime.media, runtime.pipeline
        pipe = runtime.Pipeline.from_dir({str(tiny_dir)!r})
        frames = pipe(np.zeros((64, 64, 3), np.uint8), frames=5, steps=2)
        runtime.media.write_video(frames, {str(tmp_path / "x.mp4")!r})
        assert frames.shape == (5, 64, 64, 3), frames.shape
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_no_torch_import_in_runtime_sources():
    from pathlib import Path

    import runtime

    for path in Path(runtime.__file__).parent.rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path
