"""fp16 / int8 artifacts, TensorRT engine builds, and the manifest checks the runtime makes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines import graph
from runtime import Pipeline
from runtime.errors import WanError
from runtime.manifest import load_manifest
from runtime.tensorrt_backend import check_engines, check_profile, engines_of
from tests.conftest import HAVE_TRT_BUILDER, psnr, tiny_config


@pytest.fixture(scope="session")
def reduced_dir(tiny_dir):
    """tiny at fp32, fp16 and int8, with TensorRT engines when a builder is installed (the
    session's tiny build, conftest.py)."""
    return tiny_dir


@pytest.fixture(scope="session")
def manifest(reduced_dir):
    return json.loads((reduced_dir / "manifest.json").read_text())


def test_quality_report(manifest):
    q = manifest["quality"]
    assert q["fp16"]["psnr_db"] >= 40 and q["int8"]["psnr_db"] >= 30
    assert q["fp16"]["finite"] and q["int8"]["finite"]
    for p in ("fp16", "int8"):
        assert set(q[p]["stage_max_rel"]) == {"vae_encoder", "dit", "vae_decoder"}
        for name, stage in manifest["stages"].items():
            assert stage["artifacts"][p]["validation"]["finite"]
    assert 0 < q["int8"]["stage_max_rel"]["dit"] < 0.5  # quantized, and not broken
    # on a CPU-only ONNX Runtime fp16 is measured through emulations, and the report says so
    cpu_only = q["fp16"]["providers"] == ["CPUExecutionProvider"]
    assert ("note" in q["fp16"]) == cpu_only and "note" not in q["int8"]
    cal = manifest["calibration"]
    assert cal["seeds"] and cal["dit_calls"] == len(cal["seeds"]) * cal["steps"]
    assert not set(cal["seeds"]) & set(cal["holdout_seeds"])


def test_fp16_emulation_rounds_what_the_cpu_would_not(reduced_dir, tmp_path):
    """ONNX Runtime on an x86 CPU runs fp16 MatMul/Conv in fp32 and drops the rounding; the
    emulation used to measure fp16 there keeps it: fp16-sized error against fp32, not ~0.
    The emulated graphs are for measuring only and are not left in the artifacts."""
    import numpy as np
    import onnxruntime as ort

    from engines import fp16

    root = reduced_dir
    spec = load_manifest(root).stages["dit"].spec
    feed = spec.sample_inputs({"B": 2, "F": 3, "Hp": 4, "Wp": 4})
    fp16.emulate(root / "onnx/fp16/dit.onnx", tmp_path / "dit.emulated.onnx")
    out = {p.name: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
           for p in (root / "onnx/fp32/dit.onnx", tmp_path / "dit.emulated.onnx")}
    ref, emulated = out["dit.onnx"], out["dit.emulated.onnx"]
    assert 1e-5 < np.abs(emulated - ref).max() / np.abs(ref).max() < 2e-2
    assert not list(root.rglob("*.emulated.onnx*"))


def test_fp16_keeps_fp32_islands(reduced_dir, manifest):
    details = manifest["stages"]["dit"]["artifacts"]["fp16"]["details"]
    assert details["fp16_nodes"] > 0 and details["fp32_reasons"]
    model = onnx.load(str(reduced_dir / "onnx/fp16/dit.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    half_ops = {n.op_type for n in model.graph.node
                if any(i in inits and inits[i].data_type == onnx.TensorProto.FLOAT16 for i in n.input)}
    assert half_ops and half_ops <= {"MatMul", "Gemm", "Conv"}
    for node in model.graph.node:  # norms read fp32 weights (none were converted)
        if node.op_type == "LayerNormalization":
            assert all(inits[i].data_type == onnx.TensorProto.FLOAT for i in node.input[1:] if i in inits)
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int8_is_symmetric_qdq_with_float_biases(reduced_dir, manifest):
    details = manifest["stages"]["dit"]["artifacts"]["int8"]["details"]
    assert details["float_layers"] == ["patch_embedding", "condition_embedder", "proj_out", "blocks.*.attn2"]
    assert details["quantized_nodes"] > 0 and details["float_nodes"]
    model = onnx.load(str(reduced_dir / "onnx/int8/dit.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    per_channel = 0
    for node in dq:
        if node.input[0] in inits:
            assert inits[node.input[0]].data_type == onnx.TensorProto.INT8  # no int32 bias DQ
            per_channel += numpy_helper.to_array(inits[node.input[1]]).size > 1
        if len(node.input) > 2 and node.input[2] in inits:
            assert not numpy_helper.to_array(inits[node.input[2]]).any()  # zero points are 0
    assert per_channel > 0
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    for name in details["float_nodes"]:  # the excluded layers read no dequantized tensor
        node = next(n for n in model.graph.node if n.name == name)
        assert not any(producer.get(i) == "DequantizeLinear" for i in node.input), name
    quantized = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
                 and n.name not in details["float_nodes"]]
    assert any(producer.get(i) == "DequantizeLinear" for n in quantized for i in n.input)


def test_vae_fallback_is_recorded(manifest):
    """Where a reduced VAE misses the video bar, the stage reuses the fp32 graph and says why."""
    for p in ("fp16", "int8"):
        for name in ("vae_encoder", "vae_decoder"):
            art = manifest["stages"][name]["artifacts"][p]
            if art["path"].startswith("onnx/fp32/"):
                assert art["details"]["kept"] == "fp32" and "dB" in art["details"]["reason"]
                assert manifest["quality"][p]["vae"].startswith("fp32")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_runs_end_to_end(reduced_dir, precision, reference_image):
    fp32 = Pipeline.from_dir(reduced_dir)(reference_image, frames=5, steps=3, seed=1)
    got = Pipeline.from_dir(reduced_dir, precision=precision)(reference_image, frames=5, steps=3, seed=1)
    assert got.shape == fp32.shape
    assert psnr(got, fp32) >= (40 if precision == "fp16" else 25)


def test_nodes_matching_uses_module_paths(reduced_dir):
    model = onnx.load(str(reduced_dir / "onnx/fp32/dit.onnx"), load_external_data=False)
    out = graph.nodes_matching(model, ["blocks.0.attn1.to_out.0"])
    assert out and all("blocks.0.attn1.to_out.0" in graph.module_path(
        next(n for n in model.graph.node if n.name == name)) for name in out)
    assert not graph.nodes_matching(model, ["no.such.layer"])


needs_builder = pytest.mark.skipif(not HAVE_TRT_BUILDER, reason="no TensorRT builder installed "
                                   "(pip install tensorrt-rtx builds engines without a GPU)")


@needs_builder
def test_engines_built_and_recorded(reduced_dir, manifest):
    for name, stage in manifest["stages"].items():
        for p in ("fp32", "fp16", "int8"):
            e = stage["artifacts"][p]["engine"]
            assert (reduced_dir / e["path"]).stat().st_size == e["size"] > 10_000
            assert e["path"] in manifest["files"]  # hashed like every other file
            assert e["builder"]["strongly_typed"] and e["builder"]["version"]
            assert e["symbols"]["F"] == [1, 3, 5] and e["symbols"]["Hp"] == [2, 4, 8]
            first = stage["spec"]["inputs"][0]["name"]
            assert e["profile"][first][2][-1] == (8 if name != "vae_encoder" else 64) * 2
    assert manifest["stages"]["dit"]["artifacts"]["int8"]["engine"]["symbols"]["B"] == [1, 2, 2]
    assert manifest["tools"]["tensorrt_flavour"] in ("tensorrt", "tensorrt-rtx")
    assert (reduced_dir / "engines/timing.cache").is_file()


@needs_builder
def test_runtime_refuses_mismatched_engines(reduced_dir, tmp_path):
    m = load_manifest(reduced_dir)
    engines = engines_of(m, "int8", reduced_dir)
    flavour, version = m.tools["tensorrt_flavour"], m.tools["tensorrt"]
    check_engines(engines, reduced_dir, flavour, version, "SM89")  # matches: no error
    with pytest.raises(WanError, match="built with .* this runtime has"):
        check_engines(engines, reduced_dir, flavour, "0.0.1", "SM89")
    targeted = {k: {**e, "compute_capabilities": ["SM86"]} for k, e in engines.items()}
    with pytest.raises(WanError, match="this GPU is SM90"):
        check_engines(targeted, reduced_dir, flavour, version, "SM90")
    # TensorRT-RTX has no Hopper (SM90) target; engines fail to load there without a reason
    rtx_targets = ["SM75", "SM80", "SM86", "SM89", "SM120", "SM121"]
    check_engines(engines, reduced_dir, flavour, version, "SM89", rtx_targets)
    with pytest.raises(WanError, match=r"does not run on this GPU \(SM90; it supports SM120"):
        check_engines(engines, reduced_dir, flavour, version, "SM90", rtx_targets)
    with pytest.raises(WanError, match="accepts F from 1 to 5, got 9"):
        check_profile(engines["dit"], "dit", {"B": 2, "F": 9, "Hp": 4, "Wp": 4})
    fp32_only = tmp_path / "fp32"
    shutil.copytree(reduced_dir, fp32_only)
    data = json.loads((fp32_only / "manifest.json").read_text())
    for stage in data["stages"].values():
        stage["artifacts"]["int8"].pop("engine")
    (fp32_only / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(WanError, match="no TensorRT engines for int8"):
        engines_of(load_manifest(fp32_only), "int8", fp32_only)


def test_tensorrt_backend_without_gpu_is_one_line(reduced_dir, reference_image):
    has_gpu = shutil.which("nvidia-smi") is not None
    if has_gpu or not HAVE_TRT_BUILDER:
        pytest.skip("checks the no-GPU refusal; this machine has a GPU or no engines")
    with pytest.raises(WanError) as err:
        Pipeline.from_dir(reduced_dir, precision="int8", backend="tensorrt")
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_matches_onnxruntime_on_gpu(reduced_dir, precision, reference_image):
    ort_frames = Pipeline.from_dir(reduced_dir, precision=precision)(reference_image, frames=9, steps=4)
    trt_frames = Pipeline.from_dir(reduced_dir, precision=precision, backend="tensorrt")(
        reference_image, frames=9, steps=4)
    assert psnr(trt_frames, ort_frames) >= 30


def test_bad_precision_name():
    from export.build import build_artifacts

    with pytest.raises(WanError, match="'fp8' is not one of"):
        build_artifacts(tiny_config(), "unused", precisions=("fp8",))


def test_engine_io_is_checked_against_the_spec():
    """A TensorRT engine is checked like an ONNX graph when it loads (fakes stand in for
    TensorRT's engine here: running a real one needs a GPU)."""
    from types import SimpleNamespace

    from runtime.stages import Geometry, stage_specs
    from runtime.tensorrt_backend import engine_io

    spec = stage_specs(Geometry(4))["vae_decoder"]
    trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"), nptype=lambda d: d)

    def engine(tensors):
        return SimpleNamespace(num_io_tensors=len(tensors), get_tensor_name=lambda i: tensors[i][0],
                               get_tensor_mode=lambda n: dict((t[0], t[1]) for t in tensors)[n],
                               get_tensor_dtype=lambda n: dict((t[0], t[2]) for t in tensors)[n],
                               get_tensor_shape=lambda n: dict((t[0], t[3]) for t in tensors)[n])

    good = [("latent", "in", np.float32, (-1, 4, -1, -1, -1)), ("video", "out", np.float32, (-1, 3, -1, -1, -1))]
    spec.check_graph(*engine_io(engine(good), trt), where="engines/fp32/vae_decoder.plan")
    for bad, needle in (([good[0], ("frames", "out", np.float32, (-1, 3, -1, -1, -1))], "no output 'video'"),
                        ([("latent", "in", np.float16, (-1, 4, -1, -1, -1)), good[1]], "input 'latent' is float16"),
                        ([("latent", "in", np.float32, (-1, 16, -1, -1, -1)), good[1]], "the manifest says float32")):
        with pytest.raises(WanError, match=needle):
            spec.check_graph(*engine_io(engine(bad), trt), where="engines/fp32/vae_decoder.plan")
