"""What a request to the `wan` model holds and what its streamed responses say.

Request tensors:
    request     UINT8 [n]  JSON text (UTF-8): runtime.job.Options' fields (None/absent: the manifest's default),
                           plus "image_name"/"last_image_name" (the client's file names, for errors),
                           "output": "frames" (default) or "mp4", and "fps" (for "mp4")
    image       UINT8 [n]  the first frame / reference image: the image file's bytes, as on disk
    last_image  UINT8 [n]  the last frame (Wan2.2 I2V-A14B)

Responses (decoupled: several per request, over gRPC streaming), each with an `event`:
    event   UINT8 [n]  JSON {"kind": "accepted", "frames", "height", "width", "steps", "fps", "summary"}
                            {"kind": "step", "step": i (1-based), "seconds"}
                            {"kind": "frames"}                 with `frames`
                            {"kind": "done", "timings": table} (with `video` for output "mp4")
    frames  UINT8 [n, H, W, 3]  a chunk of frames, as the streaming decoder makes them
    video   UINT8 [n]           the encoded mp4

A request the runtime refuses gets one response with Triton's error holding the runtime's line.
JSON travels as UINT8 text rather than BYTES tensors: no length-prefixed string encoding on
either side, and the same bytes whatever client library sends them.
"""

from __future__ import annotations

import json

import numpy as np

from runtime.errors import WanError
from runtime.job import Options
from runtime.media import SentFile

MODEL = "wan"
IMAGES = ("image", "last_image")
OUTPUTS = ("frames", "mp4")
EXTRA_FIELDS = ("image_name", "last_image_name", "output", "fps")
MAX_REQUEST_BYTES = 1 << 20  # a prompt is at most 20,000 characters


def encode_request(opts: Options, output: str = "frames", fps: int | None = None) -> dict[str, np.ndarray]:
    """The request tensors for `opts` (image paths are read and sent as bytes)."""
    from pathlib import Path

    fields = {name: getattr(opts, name) for name in Options.names() if name not in IMAGES}
    fields = {k: v for k, v in fields.items() if v is not None and v is not False}  # 0 is a value
    fields.update(output=output, fps=fps)
    tensors = {}
    for name in IMAGES:
        path = getattr(opts, name)
        if path is not None:
            fields[f"{name}_name"] = str(path)
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise WanError(f"{name.replace('_', ' ')} '{path}' cannot be read: {exc.strerror}") from None
            tensors[name] = np.frombuffer(data, dtype=np.uint8)
    tensors["request"] = text_tensor(fields)
    return tensors


def decode_request(raw: bytes, images: dict[str, bytes | None]) -> tuple[Options, str, int | None]:
    """(options, output, fps) from the request tensors' contents; one-line WanErrors."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise WanError(f"request is {len(raw):,} bytes of JSON: use at most {MAX_REQUEST_BYTES:,}")
    try:
        fields = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WanError(f"request is not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise WanError(f"request must be a JSON object, got {type(fields).__name__}")
    allowed = set(Options.names()) - set(IMAGES) | set(EXTRA_FIELDS)
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise WanError(f"request field {unknown[0]!r} is not allowed: use {', '.join(sorted(allowed))}")
    output, fps = fields.pop("output", None) or "frames", fields.pop("fps", None)
    if output not in OUTPUTS:
        raise WanError(f"output {output!r} is not allowed: use {' or '.join(OUTPUTS)}")
    names = {name: fields.pop(f"{name}_name", None) or name for name in IMAGES}
    for name in IMAGES:
        if images.get(name) is not None:
            fields[name] = SentFile(str(names[name]), images[name])
    if not isinstance(fields.get("still", False), bool):
        raise WanError(f"still {fields['still']!r} is not allowed: use true or false")
    if "seed" in fields and fields["seed"] is None:
        del fields["seed"]
    return Options(**fields), output, fps


def text_tensor(fields: dict) -> np.ndarray:
    """JSON as a UINT8 tensor."""
    return np.frombuffer(json.dumps(fields).encode(), dtype=np.uint8)


def event(kind: str, **fields) -> np.ndarray:
    return text_tensor({"kind": kind, **fields})
