"""One stage graph as a Triton Python-backend model, run with ONNX Runtime.

This is what `wan-serve repo` writes where Triton's own onnxruntime backend is absent (the Triton
that nvidia-pytriton bundles has only the Python backend). Each model version folder holds the
graph (linked from the artifact directory) and `stage.json`: the stage's spec, the graph's
sha256 from the manifest (checked at load, unless the graph is a hard link of the `wan` model's
artifact copy, which that model hashes: a tampered graph fails the load), and the ONNX Runtime
thread settings.

Triton's Python backend hands a dynamically batched model a list of requests without joining
them, so `execute` joins them itself: requests whose tensors agree on every axis but the first
(B) run as one call, and the outputs are split back by each request's B.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import triton_python_backend_utils as pb_utils  # provided by the Python backend's stub

from runtime.backends import StageSession, out_of_memory
from runtime.errors import WanError, is_out_of_memory
from runtime.manifest import sha256_file
from runtime.stages import StageSpec
from serve.repository import STAGE_FILE


def session_options(threads: int, spinning: bool):
    """ONNX Runtime options for a model instance that shares the server's cores with others: a
    fixed intra-op pool, one inter-op thread, and (by default) no spin-waiting, since a spinning
    pool burns the cores the other instances need (see docs/serving.md for the measurement)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def load_stage(folder: Path) -> tuple[StageSession, dict]:
    """(the stage's session, its settings) from a model version folder; a WanError when the
    graph does not match the manifest's sha256 or is not the stage the manifest says."""
    import onnxruntime as ort

    from runtime.backends import available_providers
    from runtime.request import available_cpus

    settings = json.loads((folder / STAGE_FILE).read_text())
    spec = StageSpec.from_dict(settings["stage"], settings["spec"])
    graph = folder / settings["graph"]
    copy = folder.parent.parent / "wan" / "1" / "artifacts"  # the `wan` model hashes that copy at its load
    for name, digest in settings["sha256"].items():
        source = copy / settings["source"][name]
        linked = source.exists() and (folder / name).samefile(source)  # a hard link: one file, hashed once
        if not linked and sha256_file(folder / name) != digest:
            raise WanError(f"artifact file '{folder / name}' does not match its sha256 in the manifest "
                           "(altered or corrupt); rewrite the repository with wan-serve repo")
    # threads decided where the server runs, unless the repository fixed them
    threads = settings["threads"] or max(1, available_cpus() // settings["instances"])
    session = ort.InferenceSession(str(graph), session_options(threads, settings["spinning"]),
                                   providers=available_providers())
    return StageSession(spec, session, graph), settings  # StageSession checks the graph's I/O


def batch_groups(requests_inputs: list[dict[str, np.ndarray]]) -> list[list[int]]:
    """Indices of requests that can run as one call: same names and the same shape past axis 0."""
    groups: dict[tuple, list[int]] = {}
    for i, inputs in enumerate(requests_inputs):
        key = tuple(sorted((name, a.shape[1:], a.dtype.str) for name, a in inputs.items()))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        stage, settings = load_stage(folder)
        self.spec, self.session = stage.spec, stage.session
        self.batched = settings["batched"]
        self.output_names = [t.name for t in self.spec.outputs]

    def _inputs(self, request) -> dict[str, np.ndarray]:
        out = {}
        for t in self.spec.inputs:
            a = pb_utils.get_input_tensor_by_name(request, t.name).as_numpy()
            if len(t.dims) == 1 and a.ndim == 2:  # a batch-only input travels as (B, 1): Triton needs dims
                a = a[:, 0]  # (B,)
            out[t.name] = a
        return out

    def execute(self, requests):
        responses = [None] * len(requests)
        inputs = []
        for i, request in enumerate(requests):
            try:
                inputs.append(self._inputs(request))
            except Exception as exc:  # noqa: BLE001 - a malformed request fails alone
                inputs.append(None)
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        live = [i for i, x in enumerate(inputs) if x is not None]
        groups = batch_groups([inputs[i] for i in live]) if self.batched else [[k] for k in range(len(live))]
        for group in groups:
            members = [live[k] for k in group]
            try:
                for i, outputs in zip(members, self._run([inputs[i] for i in members])):
                    tensors = [pb_utils.Tensor(name, self._shaped(name, value)) for name, value in outputs.items()]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            except WanError as exc:  # out of memory: the runtime's own line
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
            except Exception as exc:  # noqa: BLE001 - the caller gets ORT's reason in one line
                for i in members:
                    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        f"stage {self.spec.name}: {line}"))
        return responses

    def _shaped(self, name: str, value: np.ndarray) -> np.ndarray:
        return value[:, None] if self.batched and value.ndim == 1 else value  # (B,) -> (B, 1)

    def _run(self, batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """One ORT call for requests that agree past axis 0; their outputs, split per request."""
        if len(batch) == 1:
            feeds = batch[0]
        else:
            feeds = {name: np.concatenate([x[name] for x in batch]) for name in batch[0]}  # (sum B, ...)
        self.spec.bind(feeds)
        try:
            values = self.session.run(self.output_names, feeds)
        except Exception as exc:  # ONNX Runtime raises its own types; out of memory reads as locally
            if is_out_of_memory(exc):
                raise out_of_memory(self.spec.name, feeds) from None
            raise
        if len(batch) == 1:
            return [dict(zip(self.output_names, values))]
        sizes = np.cumsum([next(iter(x.values())).shape[0] for x in batch])[:-1]
        parts = [np.split(v, sizes) for v in values]
        return [{name: np.ascontiguousarray(p[k]) for name, p in zip(self.output_names, parts)}
                for k in range(len(batch))]
