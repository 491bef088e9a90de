"""`wan`: the decoupled Triton Python model that generates a video over the stage models.

At load it reads the artifact directory linked into its version folder (`artifacts/`) with
every file re-hashed against the manifest (by one instance per group), and checks that each stage model's graph is the one
the manifest lists; a tampered file fails the load with the runtime's integrity error.

Per request it runs the runtime's own code (runtime.job.prepare, then the family pipeline's
denoising loop), with a backend whose stages are calls to the stage models by name
(`InferenceRequest.exec()`, BLS): the request is checked exactly as `wan-run` checks it, and each
DiT call is a Triton request the DiT model's dynamic batcher can join with other videos' steps.
It streams an "accepted" event, one event per step, the frames as the decoder makes them, then
"done" (serve/protocol.py). A refused request gets Triton's error holding the runtime's line.
A request the client cancelled stops at the next step.

Each model instance generates one video at a time; `instance_group` says how many at once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

import triton_python_backend_utils as pb_utils  # provided by the Python backend's stub

from runtime.backends import check_finite
from runtime.errors import WanError
from runtime.job import prepare
from runtime.manifest import load_manifest
from serve.protocol import IMAGES, decode_request, event
from serve.repository import STAGE_FILE

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The client went away: stop generating."""


class TritonStage:
    """A stage as the runtime calls it (`stage(**inputs) -> outputs`), run by the stage model
    of the same name in this server."""

    def __init__(self, spec, batched: bool):
        self.spec, self.batched = spec, batched
        self.output_names = [t.name for t in spec.outputs]

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self.spec.bind(inputs)
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(a[:, None] if self.batched and a.ndim == 1 else a))
                   for name, a in inputs.items()]  # a (B,) input travels as (B, 1) to a batched model
        response = pb_utils.InferenceRequest(model_name=self.spec.name, inputs=tensors,
                                             requested_output_names=self.output_names).exec()
        if response.has_error():
            raise WanError(response.error().message())
        outputs = {}
        for t in self.spec.outputs:
            a = pb_utils.get_output_tensor_by_name(response, t.name).as_numpy()
            outputs[t.name] = a[:, 0] if len(t.dims) == 1 and a.ndim == 2 else a
        return check_finite(self.spec.name, outputs)


class TritonBackend:
    """The runtime's backend interface over Triton stage models; arrays stay numpy on the host."""

    xp = np

    def __init__(self, manifest, batched: set[str]):
        self.stages = {name: TritonStage(stage.spec, name in batched) for name, stage in manifest.stages.items()}

    @staticmethod
    def to_device(a):
        return a

    @staticmethod
    def to_host(a):
        return np.asarray(a)


def check_stage_models(repository: Path, root: Path, manifest) -> set[str]:
    """Each stage model's graph files are the manifest's (the same file, or the same sha256);
    returns the stages whose models batch across requests."""
    from runtime.manifest import sha256_file

    batched = set()
    for name in manifest.stages:
        settings = json.loads((repository / name / "1" / STAGE_FILE).read_text())
        for rel, digest in settings["sha256"].items():
            path = repository / name / "1" / rel
            source = root / settings["source"][rel]
            if not (path.exists() and (path.samefile(source) or sha256_file(path) == digest)):
                raise WanError(f"artifact file '{path}' does not match its sha256 in the manifest (altered or "
                               "corrupt); rewrite the repository with wan-serve repo")
        if settings["batched"]:
            batched.add(name)
    return batched


class TritonPythonModel:
    def initialize(self, args):
        from runtime.pipeline import Pipeline

        folder = Path(args["model_repository"]) / args["model_version"]
        root = folder / "artifacts"
        # Instance 0 of each group re-hashes every file (its failure fails the model's load, and
        # Triton then exits); the other instances read the same files and need not hash them again.
        first = args.get("model_instance_name", "_0").endswith("_0")
        manifest = load_manifest(root, verify="full" if first else "none")
        batched = check_stage_models(Path(args["model_repository"]).parent, root, manifest)
        self.pipe = Pipeline.for_manifest(root, manifest, TritonBackend(manifest, batched))

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.generate(request, sender)
            except Cancelled:
                _final(sender)
            except WanError as exc:
                _final(sender, pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
            except Exception as exc:  # noqa: BLE001 - a bug: the client still gets one line
                log.exception("generation failed")
                _final(sender, pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"internal error in the wan model: {type(exc).__name__}: {exc}")))
        return None  # decoupled: every response went through its sender

    def generate(self, request, sender) -> None:
        raw = pb_utils.get_input_tensor_by_name(request, "request").as_numpy().tobytes()
        images = {}
        for name in IMAGES:
            t = pb_utils.get_input_tensor_by_name(request, name)
            images[name] = None if t is None else t.as_numpy().tobytes()
        opts, output, fps = decode_request(raw, images)
        job = prepare(self.pipe, opts)
        req, sampler = job.request, self.pipe.manifest.sampler
        if output == "mp4":
            from runtime.media import check_fps

            fps = check_fps(sampler["fps"] if fps is None else fps, "mp4")

        def send(kind: str, **fields):
            if sender.is_cancelled():
                raise Cancelled
            tensors = [pb_utils.Tensor("event", event(kind, **{k: v for k, v in fields.items()
                                                              if not isinstance(v, np.ndarray)}))]
            tensors += [pb_utils.Tensor(k, v) for k, v in fields.items() if isinstance(v, np.ndarray)]
            try:
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception:  # noqa: BLE001 - the client went away between the check and the send
                raise Cancelled from None

        send("accepted", frames=req.frames, height=req.height, width=req.width, steps=req.steps,
             fps=sampler["fps"], summary=job.summary)
        chunks = job.chunks(lambda i, seconds: send("step", step=i + 1, seconds=seconds))
        if output == "mp4":
            video = encode_mp4(chunks, fps)
            extra = {"video": np.frombuffer(video, dtype=np.uint8)}
        else:
            for chunk in chunks:
                send("frames", frames=np.ascontiguousarray(chunk))
            extra = {}
        tensors = [pb_utils.Tensor("event", event("done", timings=job.timings.table()))]
        tensors += [pb_utils.Tensor(k, v) for k, v in extra.items()]
        sender.send(pb_utils.InferenceResponse(output_tensors=tensors),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _final(sender, response=None) -> None:
    """End a request's stream; a client already gone cannot be told anything."""
    try:
        if response is None:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception:  # noqa: BLE001
        log.debug("could not end a request's stream (its client is gone)")


def encode_mp4(chunks, fps: int) -> bytes:
    """The frame chunks as H.264 mp4 bytes (written through the runtime's own writer)."""
    import tempfile

    from runtime.media import write_video

    with tempfile.TemporaryDirectory(prefix="wan-serve-") as tmp:
        path = write_video(chunks, Path(tmp) / f"video-{time.monotonic_ns()}.mp4", fps=fps)
        return Path(path).read_bytes()
