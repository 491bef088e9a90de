"""Reference-image loading and video writing/reading (MP4, GIF, PNG folder), without torch.

Outputs are written atomically: to a hidden temporary sibling first, then renamed into place, so
a crash or Ctrl+C never leaves a half-written video or clobbers an existing one.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import os
import re
import secrets
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc, Colorspace
from PIL import Image, ImageSequence, UnidentifiedImageError

from runtime.errors import WanError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Output kinds by file suffix; a name without a suffix (or a folder) means PNG frames.
_SUFFIX_KINDS = {".mp4": "mp4", ".gif": "gif"}
_FRAME_NAME = "frame_{:04d}.png"
_FRAME_RE = re.compile(r"frame_(\d+)\.png")

# H.264 settings: crf 18 is visually near-lossless; yuv420p is what every player decodes.
_H264_OPTIONS = {"crf": "18", "preset": "medium"}


# --- reference images -------------------------------------------------------------------------


def load_image(path: PathLike, height: int, width: int) -> np.ndarray:
    """Read an image, scale it to cover (height, width), centre-crop, return uint8 (H, W, 3)."""
    if height <= 0 or width <= 0:
        raise WanError(f"image size {height}x{width} is invalid; height and width must be > 0")
    path = Path(path)
    if not path.exists():
        raise WanError(f"reference image '{path}' does not exist")
    if path.is_dir():
        raise WanError(f"reference image '{path}' is a directory, not an image file")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise WanError(
            f"reference image '{path}' cannot be read as an image: {_short_reason(exc)}"
        ) from exc
    log.debug("loaded %s (%dx%d, %s)", path, rgb.width, rgb.height, img.mode)
    return np.asarray(_cover_crop(rgb, height, width), dtype=np.uint8)


def _cover_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Resize keeping aspect ratio so the image covers the target, then crop the centre."""
    scale = max(height / img.height, width / img.width)
    # max() guards against float rounding leaving the covering side one pixel short.
    new_w = max(width, round(img.width * scale))
    new_h = max(height, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    left = (new_w - width) // 2
    top = (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def _short_reason(exc: BaseException) -> str:
    """One line saying why a file could not be read, without Python's error decoration."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- output paths -----------------------------------------------------------------------------


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


def check_output(path: PathLike, overwrite: bool) -> Path:
    """Validate an output path up front, so a bad name fails before minutes of sampling."""
    output_kind(path)
    out = Path(path)
    parent = out.parent
    if not parent.exists():
        raise WanError(f"output folder '{parent}' does not exist; create it first")
    if not parent.is_dir():
        raise WanError(f"output folder '{parent}' is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WanError(f"output folder '{parent}' is not writable")
    if _exists(out) and not overwrite:
        raise WanError(f"output '{path}' already exists; pass --overwrite to replace it")
    return out


def _exists(path: Path) -> bool:
    # A dangling symlink still occupies the name, so count it as existing.
    return path.exists() or path.is_symlink()


# --- writing ----------------------------------------------------------------------------------


def write_video(
    frames: np.ndarray | Iterable[np.ndarray], path: PathLike, fps: int = 16, overwrite: bool = False
) -> Path:
    """Write uint8 frames (T, H, W, 3) as MP4, GIF or a PNG folder, atomically; return the path.

    `frames` may also be an iterable of such chunks (a streaming decoder's output): MP4 and PNG
    frames are encoded as each chunk arrives, so the whole clip never has to be in memory.
    """
    chunks = iter([frames]) if isinstance(frames, np.ndarray) else iter(frames)
    first = next(chunks, None)
    if first is None:
        raise ValueError("frames must not be empty, got no chunks")
    _check_frames(first)
    if isinstance(fps, bool) or not isinstance(fps, numbers.Integral) or fps <= 0:
        raise WanError(f"fps {fps!r} is invalid; use a whole number of frames per second above 0")
    fps = int(fps)
    out = check_output(path, overwrite)
    kind = output_kind(path)
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

    if kind == "png":
        _write_png_folder(each_frame(), out, overwrite)
    else:
        writer = _write_mp4 if kind == "mp4" else _write_gif
        _write_file_atomically(lambda tmp: writer(each_frame(), size, tmp, fps), out, overwrite)
    log.debug("wrote %d frames (%dx%d, %d fps) to %s", count[0], size[1], size[0], fps, out)
    return out


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


def _write_file_atomically(write: Callable[[Path], None], out: Path, overwrite: bool) -> None:
    """Run `write` on a temporary sibling of `out`, then rename it over `out`."""
    # Same directory, so os.replace is a rename on one filesystem (atomic); same suffix, so
    # encoders that look at the name still see the right format. Leading dot hides it.
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}{out.suffix}")
    try:
        write(tmp)
        _refuse_if_appeared(out, overwrite)
        os.replace(tmp, out)
    except BaseException:  # includes KeyboardInterrupt: never leave a partial file behind
        tmp.unlink(missing_ok=True)
        raise


def _write_png_folder(frames: Iterable[np.ndarray], out: Path, overwrite: bool) -> None:
    """Write frame_0000.png... into a temporary folder, then swap it in for `out`."""
    # os.mkdir (not tempfile.mkdtemp) so the folder gets normal permissions, not 0700.
    tmp = _unused_sibling(out, "partial")
    os.mkdir(tmp)
    try:
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / _FRAME_NAME.format(i), format="PNG")
        _refuse_if_appeared(out, overwrite)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, out: Path) -> None:
    """Move folder `new` to `out`; an existing `out` is set aside first and deleted last."""
    # A non-empty folder cannot be replaced in one rename, so: old aside, new in, old away.
    # Until the new one is in place the old one is restored on failure.
    if not _exists(out):
        os.rename(new, out)
        return
    old = _unused_sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    try:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    except OSError as exc:
        # The new output is complete and in place; a leftover is only clutter.
        log.warning("could not remove the replaced output '%s': %s", old, exc)


def _unused_sibling(out: Path, tag: str) -> Path:
    """A hidden name next to `out` that nothing else uses."""
    while True:
        candidate = out.with_name(f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")
        if not _exists(candidate):
            return candidate


def _refuse_if_appeared(out: Path, overwrite: bool) -> None:
    # check_output ran before the (slow) encode; something may have taken the name since.
    if not overwrite and _exists(out):
        raise WanError(f"output '{out}' already exists; pass --overwrite to replace it")


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


def _write_gif(frames: Iterable[np.ndarray], size: tuple[int, int], path: Path, fps: int) -> None:
    images = [Image.fromarray(frame) for frame in frames]  # GIF is written in one go
    # GIF stores delays in 1/100 s, so the frame rate is approximate.
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=round(1000 / fps),
        loop=0,  # loop forever
    )


# --- reading ----------------------------------------------------------------------------------


def read_video(path: PathLike) -> np.ndarray:
    """Read an MP4, GIF or PNG folder written by `write_video` as uint8 (T, H, W, 3).

    GIF note: Pillow merges consecutive identical frames when writing (keeping the total
    duration), so a GIF can read back with fewer frames than were written.
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
                frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)]
        else:
            with av.open(str(path)) as box:
                frames = [f.to_ndarray(format="rgb24") for f in box.decode(video=0)]
    except (OSError, SyntaxError, ValueError, av.FFmpegError) as exc:
        raise WanError(f"video '{path}' cannot be read: {_short_reason(exc)}") from exc
    if not frames:
        raise WanError(f"video '{path}' contains no frames")
    return np.stack(frames).astype(np.uint8, copy=False)


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
