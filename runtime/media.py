"""Reference-image loading and video writing/reading (MP4, GIF, PNG folder), without torch.

Outputs are written atomically: to a hidden partial sibling first, then renamed into place
(runtime/files.py), so a crash, Ctrl+C or SIGTERM never leaves a half-written video, and nothing
is replaced but an earlier output, and only with `overwrite`.
"""

from __future__ import annotations

import io
import itertools
import logging
import numbers
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc, Colorspace
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from runtime.errors import ENVIRONMENT_ERRNOS, WanError
from runtime.files import (absolute, check_replaceable_place, check_writable_dir, clean_stale, commit,
                           environment_error, exists, partial_name, regular_file, remove)

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Output kinds by file suffix; a name without a suffix (or a folder) means PNG frames.
_SUFFIX_KINDS = {".mp4": "mp4", ".gif": "gif"}
_FRAME_NAME = "frame_{:04d}.png"
_FRAME_RE = re.compile(r"frame_(\d+)\.png")

# H.264 settings: crf 18 is visually near-lossless; yuv420p is what every player decodes.
_H264_OPTIONS = {"crf": "18", "preset": "medium"}


# --- reference images -------------------------------------------------------------------------


# A reference image is decoded whole before it is scaled, so its size is checked first, from the
# header: 100 megapixels (a 300 MB RGB decode) covers any camera; an aspect ratio beyond 16:1 is
# no picture of a subject (a 1 x 2,000,000 PNG is 4 KB on disk).
MAX_IMAGE_PIXELS = 100_000_000
MAX_IMAGE_ASPECT = 16


@dataclass(frozen=True)
class SentFile:
    """An image file's bytes as a client sent them (wan-run --server), under the name it had
    there: read like a file of that name, so errors read as they do locally."""

    name: str
    data: bytes


def load_image(path: PathLike | SentFile, height: int | None = None, width: int | None = None,
               fit: str = "cover", what: str = "reference image") -> np.ndarray:
    """Read an image and bring it to (height, width); return uint8 (H, W, 3). `fit`: "cover"
    scales it to cover the size and takes the centre (bicubic; the seed family), "stretch"
    resizes it to the size exactly (Lanczos, as diffusers' VaeImageProcessor does), "none" keeps
    it as it is (released models resize it per stage, as diffusers' pipelines do)."""
    if fit != "none" and (height is None or width is None or height <= 0 or width <= 0):
        raise WanError(f"image size {height}x{width} is invalid; height and width must be > 0")
    if isinstance(path, SentFile):
        source, path = io.BytesIO(path.data), path.name
    else:
        source = path = regular_file(path, what)
    try:
        with Image.open(source) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS or max(w, h) > MAX_IMAGE_ASPECT * min(w, h):
                raise WanError(f"{what} '{path}' is {w}x{h} pixels: use at most "
                               f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels and an aspect ratio up to "
                               f"{MAX_IMAGE_ASPECT}:1")
            if fit == "cover":  # JPEG: decode at a reduced size; not for released models, which
                img.draft("RGB", _cover_size(w, h, height, width))  # must see diffusers' pixels
            img.load()  # decode now, so a truncated file fails here and not later
            # a photo's EXIF orientation applied, as diffusers' load_image and every viewer do
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise WanError(
            f"{what} '{path}' cannot be read as an image: {_short_reason(exc)}"
        ) from exc
    log.debug("loaded %s (%dx%d, %s)", path, rgb.width, rgb.height, img.mode)
    if fit == "stretch":
        return resize_exact(np.asarray(rgb, dtype=np.uint8), height, width)
    if fit == "none":
        return np.asarray(rgb, dtype=np.uint8)
    return np.asarray(_cover_crop(rgb, height, width), dtype=np.uint8)


def resize_exact(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h, w, 3) -> (height, width, 3) with Pillow's Lanczos, as diffusers resizes a
    pipeline's image (unchanged when the size already matches)."""
    if image.shape[:2] == (height, width):
        return image
    h, w = image.shape[:2]
    if h * w > MAX_IMAGE_PIXELS or max(w, h) > MAX_IMAGE_ASPECT * min(w, h):
        raise WanError(f"image array is {w}x{h} pixels: use at most {MAX_IMAGE_PIXELS // 1_000_000} "
                       f"megapixels and an aspect ratio up to {MAX_IMAGE_ASPECT}:1")
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def _cover_size(w: int, h: int, height: int, width: int) -> tuple[int, int]:
    """The size (w, h) of the image scaled to cover (height, width), keeping its aspect ratio."""
    scale = max(height / h, width / w)
    # max() guards against float rounding leaving the covering side one pixel short.
    return max(width, round(w * scale)), max(height, round(h * scale))


def _cover_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Scale keeping the aspect ratio so the image covers the target, and take the centre: the
    source box that maps onto the target is resampled directly, so memory is the target's."""
    new_w, new_h = _cover_size(img.width, img.height, height, width)
    if (new_w, new_h) == img.size:
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return img.crop((left, top, left + width, top + height))
    sx, sy = img.width / new_w, img.height / new_h  # source pixels per covered pixel
    left, top = (new_w - width) // 2, (new_h - height) // 2
    box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
    return img.resize((width, height), Image.Resampling.BICUBIC, box=box, reducing_gap=None)


def _short_reason(exc: BaseException) -> str:
    """One line saying why a file could not be read, without Python's error decoration."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- output paths -----------------------------------------------------------------------------

# The highest frame rate each container stores faithfully: GIF counts delays in 1/100 s and
# browsers stretch delays under 2/100 s to 1/10 s; H.264 levels top out near 120 fps at 1080p.
MAX_FPS = {"mp4": 120, "gif": 50, "png": 120}
_MAGIC = {"mp4": lambda head: head[4:8] == b"ftyp", "gif": lambda head: head[:6] in (b"GIF87a", b"GIF89a")}
OVERWRITE_HINT = "--overwrite replaces only a video or a folder of frames"


def output_kind(path: PathLike) -> str:
    """'mp4', 'gif' or 'png' (a folder of PNG frames), decided by the output name."""
    text = os.fspath(path)
    if not text:
        raise WanError("output path is empty; use a .mp4 or .gif name, or a folder name")
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return "png"
    suffix = Path(text).suffix.lower()
    if not suffix:
        return "png"
    if suffix in _SUFFIX_KINDS:
        return _SUFFIX_KINDS[suffix]
    raise WanError(
        f"output '{text}' has an unsupported format; "
        "use a .mp4 or .gif name, or a folder name for PNG frames"
    )


def check_fps(fps, kind: str) -> int:
    """The frame rate as an int, if `kind`'s container stores it faithfully."""
    limit = MAX_FPS[kind]
    if isinstance(fps, bool) or not isinstance(fps, numbers.Integral) or not 1 <= fps <= limit:
        raise WanError(f"fps {fps!r} is not allowed: use a whole number from 1 to {limit} "
                       f"(the most a {kind.upper()} output stores faithfully)")
    return int(fps)


def not_our_output(path: Path, kind: str) -> str | None:
    """None if `path` is an output of `kind` that --overwrite may replace (a video file, a folder
    holding only frame PNGs), else why not. A link is replaced itself, never what it points to."""
    if kind == "png":
        if path.is_symlink() or not path.is_dir():
            return "is not a folder of frames"
        for entry in path.iterdir():
            if not (_FRAME_RE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink()):
                return f"holds '{entry.name}', which is not a frame written by wan-run"
        return None
    if path.is_symlink():
        return None
    if not path.is_file():
        return f"is not a {kind.upper()} file"
    with open(path, "rb") as f:
        head = f.read(12)
    return None if _MAGIC[kind](head) else f"is not a {kind.upper()} video (by its content)"


def check_output(path: PathLike, overwrite: bool, fps=None) -> Path:
    """Validate an output path (and `fps`, if given) up front, so a bad name fails before minutes
    of sampling. Removes partial outputs of killed runs to the same path. Returns it absolute."""
    kind = output_kind(path)
    out = absolute(path)
    if fps is not None:
        check_fps(fps, kind)
    parent = out.parent
    if not parent.exists():
        raise WanError(f"output folder '{parent}' does not exist; create it first")
    if not parent.is_dir():
        raise WanError(f"output folder '{parent}' is not a folder")
    check_writable_dir(parent, "output folder")
    clean_stale(out)
    if exists(out):
        if not overwrite:
            raise WanError(f"output '{path}' already exists; pass --overwrite to replace it")
        check_replaceable_place(out, "output")
        why = not_our_output(out, kind)
        if why is not None:
            raise WanError(f"output '{path}' {why}; not replaced ({OVERWRITE_HINT})")
    return out


# --- writing ----------------------------------------------------------------------------------


def write_video(
    frames: np.ndarray | Iterable[np.ndarray], path: PathLike, fps: int = 16, overwrite: bool = False
) -> Path:
    """Write uint8 frames (T, H, W, 3) as MP4, GIF or a PNG folder, atomically; return the path.

    `frames` may also be an iterable of such chunks (a streaming decoder's output): MP4 and PNG
    frames are encoded as each chunk arrives, so the whole clip never has to be in memory.
    Nothing the user has is replaced unless `overwrite`, and then only an earlier output.
    """
    kind = output_kind(path)
    fps = check_fps(fps, kind)
    chunks = iter([frames]) if isinstance(frames, np.ndarray) else iter(frames)
    first = next(chunks, None)
    if first is None:
        raise ValueError("frames must not be empty, got no chunks")
    _check_frames(first)
    out = check_output(path, overwrite)
    size = first.shape[1:3]
    if kind == "mp4" and (size[0] % 2 or size[1] % 2):
        raise ValueError(f"MP4 (yuv420p) needs an even frame size, got {size}")
    count = [0]

    def each_frame():
        for chunk in itertools.chain([first], chunks):
            _check_frames(chunk)
            if chunk.shape[1:3] != size:
                raise ValueError(f"frame chunks changed size from {size} to {chunk.shape[1:3]}")
            count[0] += len(chunk)
            yield from chunk

    tmp = partial_name(out)
    try:
        if kind == "png":
            os.mkdir(tmp)  # os.mkdir (not tempfile.mkdtemp): normal permissions, not 0700
            for i, frame in enumerate(each_frame()):
                Image.fromarray(frame).save(tmp / _FRAME_NAME.format(i), format="PNG")
        else:
            writer = _write_mp4 if kind == "mp4" else _write_gif
            writer(each_frame(), size, tmp, fps)
        commit(tmp, out, overwrite, lambda p: not_our_output(p, kind), "output",
               "pass --overwrite to replace it")
    except BaseException as exc:  # includes Ctrl+C / SIGTERM: never leave a partial behind
        if exists(tmp):
            remove(tmp)
        err = getattr(exc, "errno", None)
        if isinstance(exc, (OSError, av.FFmpegError)) and err in ENVIRONMENT_ERRNOS:
            raise environment_error(exc, "output", path) from None
        raise
    log.debug("wrote %d frames (%dx%d, %d fps) to %s", count[0], size[1], size[0], fps, out)
    return Path(path)


def _check_frames(frames: np.ndarray) -> None:
    # Bad frames are a bug in the caller, not a user mistake: ValueError, not WanError.
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {frames.shape}")
    if min(frames.shape[:3]) == 0:
        raise ValueError(f"frames must not be empty, got shape {frames.shape}")


def _write_mp4(frames: Iterable[np.ndarray], size: tuple[int, int], path: Path, fps: int) -> None:
    """H.264 in MP4, tagged BT.709 limited range so players show the colours we encoded."""
    height, width = size
    time_base = Fraction(1, fps)
    # faststart puts the index first, so browsers can play before the download finishes.
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as box:
        stream = box.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = dict(_H264_OPTIONS)
        # swscale converts RGB with BT.601 unless told otherwise, while players assume BT.709
        # for untagged HD video; convert and tag explicitly so both sides agree.
        ctx = stream.codec_context
        ctx.colorspace, ctx.color_range = Colorspace.ITU709, ColorRange.MPEG
        ctx.color_primaries, ctx.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame = video_frame.reformat(
                format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
            )
            video_frame.pts, video_frame.time_base = i, time_base
            box.mux(stream.encode(video_frame))
        box.mux(stream.encode())  # flush the frames the encoder still holds


def gif_delays_cs(count: int, fps: int) -> list[int]:
    """Per-frame GIF delays in 1/100 s whose running sum stays within half a centisecond of
    i/fps: 16 fps is 6, 6, 6, 7, ... (6.25 on average), not a flat 6 that plays at 16.7 fps."""
    return [round((i + 1) * 100 / fps) - round(i * 100 / fps) for i in range(count)]


def _write_gif(frames: Iterable[np.ndarray], size: tuple[int, int], path: Path, fps: int) -> None:
    images = [Image.fromarray(frame) for frame in frames]  # GIF is written in one go
    # Pillow takes milliseconds and stores centiseconds; it merges a frame identical to the one
    # before into it (adding the delays), which `read_video(..., fps=)` expands again.
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=[10 * d for d in gif_delays_cs(len(images), fps)],
        loop=0,  # loop forever
    )


# --- reading ----------------------------------------------------------------------------------


def read_video(path: PathLike, fps: int | None = None) -> np.ndarray:
    """Read an MP4, GIF or PNG folder written by `write_video` as uint8 (T, H, W, 3).

    GIF note: identical consecutive frames are stored once with their delays added, so a GIF
    reads back with fewer frames than were written, unless `fps` (the rate it was written at)
    is given: then each stored frame is repeated for as long as it is shown.
    """
    kind = output_kind(path)
    path = Path(path)
    if not path.exists():
        raise WanError(f"video '{path}' does not exist")
    try:
        if kind == "png":
            frames = _read_png_folder(path)
        elif kind == "gif":
            with Image.open(path) as img:
                shown = [(np.asarray(f.convert("RGB")), round(f.info.get("duration", 0) / 10))
                         for f in ImageSequence.Iterator(img)]
            frames = [f for f, _ in shown] if fps is None else _expand_gif(shown, fps)
        else:
            with av.open(str(path)) as box:
                frames = [f.to_ndarray(format="rgb24") for f in box.decode(video=0)]
    except (OSError, SyntaxError, ValueError, av.FFmpegError) as exc:
        raise WanError(f"video '{path}' cannot be read: {_short_reason(exc)}") from exc
    if not frames:
        raise WanError(f"video '{path}' contains no frames")
    return np.stack(frames).astype(np.uint8, copy=False)


def _expand_gif(shown: list[tuple[np.ndarray, int]], fps: int) -> list[np.ndarray]:
    """Frames at `fps` from (frame, delay in 1/100 s) pairs: frame i starts at round(100 i / fps)."""
    starts = np.cumsum([0] + [d for _, d in shown])  # centiseconds
    count = round(starts[-1] * fps / 100)
    at = [round(i * 100 / fps) for i in range(count)]
    return [shown[int(np.searchsorted(starts, t, side="right")) - 1][0] for t in at]


def _read_png_folder(path: Path) -> list[np.ndarray]:
    if not path.is_dir():
        raise WanError(f"PNG frame folder '{path}' is not a folder")
    numbered = []
    for entry in path.iterdir():
        match = _FRAME_RE.fullmatch(entry.name)
        if match:
            numbered.append((int(match.group(1)), entry))
    # Sort by number, not name, so frame_10000 comes after frame_9999.
    frames = []
    for _, entry in sorted(numbered):
        with Image.open(entry) as img:
            frames.append(np.asarray(img.convert("RGB")))
    return frames
