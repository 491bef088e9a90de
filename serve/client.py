"""`wan-run --server HOST:PORT`: generate through a Triton server's `wan` model over gRPC.

    job = RemoteJob("127.0.0.1:8001", Options(image="ref.png"))   # waits for "accepted" (or the refusal)
    for chunk in job.chunks(on_step):                              # progress, then uint8 frame chunks
        ...
    job.summary, job.timings.table(), job.close()

The same interface as runtime.job.Job, so wan-run writes a remote video the way it writes a
local one. A refusal arrives as Triton's error holding the runtime's one line: a WanError here.
Closing before the end cancels the request, and the server stops at its next step.
"""

from __future__ import annotations

import json
import queue
from types import SimpleNamespace

from runtime.errors import WanError
from runtime.job import Options
from serve.protocol import MODEL, encode_request

CONNECT_TIMEOUT_S = 10.0
ACCEPT_TIMEOUT_S = 3600.0  # a request waits in Triton's queue while every wan instance is busy
RESPONSE_TIMEOUT_S = 600.0  # between two responses once accepted: the longest step or decode chunk


def _grpc():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise WanError("wan-run --server needs tritonclient: pip install 'wan-export[serve]'") from None
    return grpcclient


def check_url(url: str) -> str:
    host, sep, port = url.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WanError(f"server {url!r} is not allowed: use HOST:PORT (the server's gRPC port, e.g. 127.0.0.1:8001)")
    return url


class RemoteTimings:
    def __init__(self):
        self.text = ""

    def table(self) -> str:
        return self.text


class RemoteJob:
    def __init__(self, url: str, opts: Options, output: str = "frames", fps: int | None = None,
                 response_timeout: float = RESPONSE_TIMEOUT_S):
        grpcclient = _grpc()
        from tritonclient.utils import InferenceServerException

        self._error_type = InferenceServerException
        self.url, self.timeout, self.done = check_url(url), response_timeout, False
        self.timings, self.video = RemoteTimings(), None
        self._responses: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        try:
            ready = self.client.is_model_ready(MODEL, client_timeout=CONNECT_TIMEOUT_S)
        except InferenceServerException as exc:
            raise WanError(f"cannot reach a Triton server at {url}: {_reason(exc)}") from None
        if not ready:
            raise WanError(f"the server at {url} has no ready {MODEL!r} model (is it serving a wan-serve "
                           "repository? its log says why a model failed to load)")
        inputs = []
        for name, array in encode_request(opts, output, fps).items():
            t = grpcclient.InferInput(name, list(array.shape), "UINT8")
            t.set_data_from_numpy(array)
            inputs.append(t)
        self.client.start_stream(callback=lambda result, error: self._responses.put((result, error)))
        self._streaming = True
        try:
            self.client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
            first = self._next(ACCEPT_TIMEOUT_S)
            if first[0] != "accepted":
                raise WanError(f"the server answered {first[0]!r} before accepting the request")
        except BaseException:
            self.close()
            raise
        info = first[1]
        self.request = SimpleNamespace(**{k: info[k] for k in ("frames", "height", "width", "steps")})
        self.fps, self.summary = info["fps"], info["summary"]

    def _next(self, timeout: float | None = None):
        """The next (kind, event, result) from the stream; a WanError for Triton's error. The
        response that ends the stream carries Triton's `triton_final_response` flag."""
        timeout = timeout or self.timeout
        try:
            result, error = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise WanError(f"the server at {self.url} sent nothing for {timeout:g} s; gave up") from None
        if error is not None:
            self.done = True
            raise WanError(_reason(error))
        response = result.get_response()
        final = response.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            self.done = True
        if not response.outputs:
            return "final", {}, result
        info = json.loads(result.as_numpy("event").tobytes())
        return info["kind"], info, result

    def chunks(self, on_step=None):
        """uint8 frame chunks (n, H, W, 3) as the server decodes them; `on_step(i, seconds)` per step."""
        while True:
            kind, info, result = self._next()
            if kind == "step" and on_step is not None:
                on_step(info["step"] - 1, info["seconds"])
            elif kind == "frames":
                yield result.as_numpy("frames")
            elif kind == "done":
                self.timings.text = info["timings"]
                video = result.as_numpy("video")
                self.video = None if video is None else video.tobytes()
            if self.done:
                if self.timings.text == "":  # no "done": the video was cut short (the server's log says why)
                    raise WanError(f"the server ended the stream after {kind!r}, before the video was done")
                return

    def close(self) -> None:
        """End the stream; a request still running is cancelled on the server."""
        if getattr(self, "_streaming", False):
            self._streaming = False
            self.client.stop_stream(cancel_requests=not self.done)
        self.client.close()


def _reason(exc) -> str:
    """Triton's error as the runtime's one line (gRPC adds a status prefix to some)."""
    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    text = (text or str(exc)).strip()
    for prefix in ("[StatusCode.INTERNAL] ", "[StatusCode.UNAVAILABLE] "):
        text = text.removeprefix(prefix)
    return text.splitlines()[0] if text else "the server gave no reason"
