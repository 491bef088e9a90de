"""`wan-export --text-kv` for the project's model: the reference's cross-attention keys and values
computed once per video by the `dit_context` stage. The build is the tiny full-attention one
(conftest `cli_export`, also at int8); the parity tests (test_parity.py) run it end to end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from engines import fp16, graph, int8
from engines.tensorrt import build_engine, symbol_profile
from export.weights import build_models
from runtime import Pipeline
from runtime.backends import OnnxRuntimeBackend
from runtime.manifest import load_manifest
from tests.conftest import ENGINE_SHAPES, HAVE_TRT_BUILDER, psnr, tiny_config
from tests.test_cache import count_dit_calls


@pytest.fixture(scope="module")
def kv_dir(exported):
    return exported("full")


def test_the_step_takes_the_context_stages_output(kv_dir):
    m = load_manifest(kv_dir)
    assert list(m.stages)[:4] == ["vae_encoder", "dit_context", "dit", "vae_decoder"]
    assert [t.name for t in m.stages["dit_context"].spec.inputs] == ["ref_latent", "motion"]
    assert [t.name for t in m.stages["dit"].spec.inputs] == ["latent", "timestep", "ref_kv"]
    kv = m.stages["dit_context"].spec.outputs[0]
    assert [str(d) for d in kv.dims] == ["B", "4", "F", "Hp", "Wp", "48"]  # 2 x 2 layers, dim 48
    assert kv == next(t for t in m.stages["dit"].spec.inputs if t.name == "ref_kv")
    # once per video, so fp32 at every precision; the step is quantized
    assert m.stages["dit_context"].artifacts["int8"].path == m.stages["dit_context"].artifacts["fp32"].path
    assert m.stages["dit"].artifacts["int8"].details["quantized_nodes"] > 0
    assert m.quality["int8"]["psnr_db"] >= 30


def test_the_step_graph_keeps_the_dit_module_paths(kv_dir):
    """The precision recipes name DiT layers by module path ('blocks.*.attn2', 'proj_out'), and
    so do users (--int8-float-layers): a --text-kv step graph carries the plain DiT's paths, so
    every default pattern finds its layers and int8 keeps them float."""
    m = load_manifest(kv_dir)
    step = onnx.load(str(kv_dir / m.stages["dit"].artifacts["fp32"].path), load_external_data=False)
    for pattern in (*int8.DEFAULT_FLOAT_LAYERS["dit"], *fp16.ALWAYS_FP32):
        assert graph.nodes_matching(step, [pattern], op_types=[*int8.QUANT_OPS, *fp16.FP16_OPS]), pattern
    kept = m.stages["dit"].artifacts["int8"].details["float_nodes"]
    assert set(kept) == set(graph.nodes_matching(step, list(int8.DEFAULT_FLOAT_LAYERS["dit"]), int8.QUANT_OPS))


@pytest.mark.parametrize("frames,height,width", [(5, 48, 80), (13, 64, 32)])
def test_context_and_step_graphs_match_pytorch(kv_dir, frames, height, width):
    """At sizes other than the export shape: the context graph against the PyTorch K/V, and the
    step (its ONNX Runtime graph and its portable one) fed those K/V against the whole PyTorch
    DiT, with a moving reference in one batch item."""
    pipe = Pipeline.from_dir(kv_dir)
    portable = OnnxRuntimeBackend(kv_dir, pipe.manifest, contrib_ops=False).stages["dit"]
    _, dit = build_models(tiny_config("full"))
    rng = np.random.default_rng(1)
    shape = (2, 4, 1 + (frames - 1) // 4, height // 8, width // 8)
    x = rng.standard_normal(shape).astype(np.float32)
    t = np.array([900.0, 100.0], np.float32)
    ref = rng.standard_normal((2, 4, 1, *shape[3:])).astype(np.float32)
    motion = np.tile(np.eye(2, 3, dtype=np.float32), (2, shape[2], 1, 1))  # (2, F, 2, 3)
    motion[0, :, :, 2] = np.linspace(0, 1.5, shape[2])[:, None]  # item 0 moves down-right
    with torch.no_grad():
        kv_ref = dit.reference_kv(torch.from_numpy(ref), torch.from_numpy(motion)).numpy()
        v_ref = dit(*(torch.from_numpy(a) for a in (x, t, ref, motion))).numpy()
    kv = pipe.stages["dit_context"](ref_latent=ref, motion=motion)["ref_kv"]
    assert kv.shape == (2, 4, shape[2], height // 16, width // 16, 48)
    np.testing.assert_allclose(kv, kv_ref, atol=1e-4)
    for step in (pipe.stages["dit"], portable):
        np.testing.assert_allclose(step(latent=x, timestep=t, ref_kv=kv)["velocity"], v_ref, atol=1e-4)


def test_context_runs_once_per_video(kv_dir, reference_image):
    """One context call per video, however many steps, with or without the step cache; the
    int8 video stays within its bar of fp32."""
    pipe = Pipeline.from_dir(kv_dir)
    calls = count_dit_calls(pipe, ("dit_context", "dit"))
    kw = dict(frames=9, steps=6, seed=4)
    fp32 = pipe(reference_image, **kw)
    assert calls == {"dit_context": 1, "dit": 6}
    cached = pipe.generate(reference_image, cache="teacache:0.3", **kw)
    assert calls["dit_context"] == 2 and calls["dit"] == 6 + cached.timings.dit_calls
    assert psnr(Pipeline.from_dir(kv_dir, precision="int8")(reference_image, **kw), fp32) >= 30


@pytest.mark.skipif(not HAVE_TRT_BUILDER, reason="no TensorRT builder installed "
                    "(pip install tensorrt-rtx builds engines without a GPU)")
def test_text_kv_stages_build_engines(kv_dir, tmp_path):
    """TensorRT builds the context graph and the int8 step that takes its output (running
    them needs a GPU: test_precision.py's GPU test runs the plain build's engines)."""
    m = load_manifest(kv_dir)
    for name, precision in (("dit_context", "fp32"), ("dit", "int8")):
        symbols = symbol_profile(ENGINE_SHAPES, m.geometry, m.stages[name].spec.batch, m.symbols)
        plan = tmp_path / f"{name}.plan"
        record = build_engine(kv_dir / m.stages[name].artifacts[precision].path, plan, m.stages[name].spec,
                              symbols, ENGINE_SHAPES, tmp_path / "timing.cache")
        assert plan.stat().st_size == record["size"] > 10_000
        assert record["symbols"]["B"] == [1, 2, 2]
