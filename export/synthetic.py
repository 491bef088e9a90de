"""Procedural training clips: one simple subject moving over a plain background (numpy only).

A clip is drawn in two steps so the parameters double as a description for metrics:

    subject = sample_subject(rng, spec)        shape, colours, texture, background, path per frame
    frames, coverage = render(subject, ...)    uint8 (T, H, W, 3) and the subject's pixel coverage

The subject always travels (so a model trained on these clips learns visible motion) and may
also rotate and scale; the reference image of a clip is its frame 0. Edges are anti-aliased
from a signed distance in pixels, so a sub-pixel move still changes the frame. Rendering is
vectorized over (T, H, W) in float32: a 17x128x128 clip takes about 20 ms.

Randomness: every clip has its own generator `clip_rng(seed, stream, index)`, so clip k of a
seed is the same clip whatever batch it is drawn in (the training data is reproducible and the
held-out clips are just another seed or stream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.motion import Motion

SHAPES = ("circle", "square", "triangle", "hexagon", "star", "cross", "ring")
TEXTURES = ("stripes", "checker")


@dataclass(frozen=True)
class ClipSpec:
    """What to draw. Sizes and distances are fractions of min(height, width)."""

    frames: int = 17
    height: int = 128
    width: int = 128
    shapes: tuple[str, ...] = SHAPES
    radius: tuple[float, float] = (0.12, 0.24)  # subject radius at scale 1
    travel: tuple[float, float] = (0.15, 0.45)  # distance the centre moves over the clip
    p_curved: float = 0.5  # path is a quadratic Bezier instead of a line
    p_rotate: float = 0.5
    max_turn: float = 0.5 * math.pi  # total rotation over the clip, radians (either direction)
    p_scale: float = 0.3
    max_scale: float = 1.5  # final scale in [1/max_scale, max_scale] (log-uniform)
    p_textured: float = 0.25  # stripes or checker in a second colour, fixed to the subject
    p_grey_background: float = 0.5  # else a random colour
    min_contrast: float = 100.0  # RGB distance subject <-> background (0..441)


@dataclass(frozen=True)
class Subject:
    """Everything that defines a clip; `render` is a pure function of it."""

    shape: str
    texture: str  # "plain", "stripes" or "checker"
    colour: tuple[int, int, int]  # main RGB colour
    colour2: tuple[int, int, int]  # texture colour (== colour when plain)
    background: tuple[int, int, int]
    radius: float  # pixels at scale 1
    centres: np.ndarray  # (T, 2) float pixel coordinates (x, y)
    angles: np.ndarray  # (T,) radians
    scales: np.ndarray  # (T,)

    @property
    def mean_colour(self) -> np.ndarray:
        """The subject's average RGB as drawn (the two texture colours cover about half each)."""
        c = np.asarray(self.colour, np.float64)
        return c if self.texture == "plain" else (c + np.asarray(self.colour2, np.float64)) / 2


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    coverage: np.ndarray  # float32 (T, H, W): fraction of each pixel covered by the subject
    subject: Subject

    @property
    def reference(self) -> np.ndarray:
        """The conditioning image: the subject as it appears in the first frame, (H, W, 3)."""
        return self.frames[0]

    @property
    def masks(self) -> np.ndarray:
        """bool (T, H, W): pixels at least half covered by the subject."""
        return self.coverage >= 0.5

    def describe(self) -> dict:
        """What is in the clip, for metrics and debugging: shape, texture, colours (RGB), the
        subject's average drawn colour, its centre per frame and its mask per frame."""
        s = self.subject
        return {"shape": s.shape, "texture": s.texture, "colour": s.colour, "colour2": s.colour2,
                "background": s.background, "mean_colour": s.mean_colour.tolist(),
                "centres": s.centres, "masks": self.masks}


def motion_of(subject: Subject, spec: ClipSpec) -> Motion:
    """The clip's motion as the runtime describes it (runtime/motion.py): `Motion.path` from
    the subject's first centre gives back its centres, turns and scales."""
    c, T = subject.centres, len(subject.centres)
    unit = min(spec.height, spec.width)
    if T < 3:
        return Motion()
    d = c[-1] - c[0]
    # Bezier minus chord is 2 s (1 - s) (control - chord midpoint), and the path's midpoint is
    # halfway to the control point: any inner frame gives the midpoint's offset.
    k = (T - 1) // 2
    s = k / (T - 1)
    offset = (c[k] - ((1 - s) * c[0] + s * c[-1])) / (4 * s * (1 - s))
    dist = float(np.hypot(*d))
    bend = float(offset @ np.array([-d[1], d[0]]) / dist / unit) if dist > 0 else 0.0
    return Motion((float(d[0] / unit), float(d[1] / unit)), bend,
                  math.degrees(float(subject.angles[-1] - subject.angles[0])),
                  float(subject.scales[-1] / subject.scales[0]))


def clip_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of clip `index` in data stream `stream` (training, held-out, ...) of `seed`."""
    return np.random.default_rng([seed, stream, index])


# --- sampling ---------------------------------------------------------------------------------

def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float64)


def _background(rng: np.random.Generator, spec: ClipSpec) -> np.ndarray:
    if rng.random() < spec.p_grey_background:
        return np.full(3, float(rng.integers(0, 256)))
    return _colour(rng)


def _contrasting(rng: np.random.Generator, background: np.ndarray, min_contrast: float) -> np.ndarray:
    """A random colour at least `min_contrast` away from the background (rejection sampling;
    a colour space corner always qualifies, since any colour is >= 221 from one of them)."""
    for _ in range(64):
        c = _colour(rng)
        if np.linalg.norm(c - background) >= min_contrast:
            return c
    corners = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], np.float64)
    return corners[np.argmax(np.linalg.norm(corners - background, axis=1))]


def _path(rng: np.random.Generator, spec: ClipSpec, margin: float) -> np.ndarray:
    """(T, 2) centres inside [margin, size - margin] that travel at least spec.travel[0]."""
    T, H, W = spec.frames, spec.height, spec.width
    unit = min(H, W)
    lo, hi = np.array([margin, margin]), np.array([W - margin, H - margin])
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)  # a huge subject: just stay near the middle
    s = np.linspace(0.0, 1.0, T)[:, None]  # (T, 1) clip time
    for _ in range(32):
        start = rng.uniform(lo, hi)
        angle = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(*spec.travel) * unit
        end = start + dist * np.array([math.cos(angle), math.sin(angle)])
        if rng.random() < spec.p_curved:
            normal = np.array([-math.sin(angle), math.cos(angle)])
            control = (start + end) / 2 + rng.uniform(-0.6, 0.6) * dist * normal
        else:
            control = (start + end) / 2
        centres = (1 - s) ** 2 * start + 2 * (1 - s) * s * control + s**2 * end  # quadratic Bezier
        if np.all(centres >= lo - 1e-9) and np.all(centres <= hi + 1e-9):
            return centres
    # Rarely nothing fits (a big subject): a straight move across the middle, as far as fits.
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    return mid + (2 * s - 1) * half * np.array([1.0, 0.0])


def sample_subject(rng: np.random.Generator, spec: ClipSpec) -> Subject:
    T = spec.frames
    unit = min(spec.height, spec.width)
    background = _background(rng, spec)
    colour = _contrasting(rng, background, spec.min_contrast)
    textured = rng.random() < spec.p_textured
    texture = str(rng.choice(TEXTURES)) if textured else "plain"
    colour2 = _contrasting(rng, background, spec.min_contrast) if textured else colour
    shape = str(rng.choice(spec.shapes))
    radius = rng.uniform(*spec.radius) * unit
    s = np.linspace(0.0, 1.0, T)
    angle0 = rng.uniform(0, 2 * math.pi)
    turn = rng.uniform(-spec.max_turn, spec.max_turn) if rng.random() < spec.p_rotate else 0.0
    end_scale = (math.exp(rng.uniform(-1, 1) * math.log(spec.max_scale))
                 if rng.random() < spec.p_scale else 1.0)
    scales = np.exp(s * math.log(end_scale))  # geometric: the same relative growth every frame
    # Shapes reach at most 1.2 radii from their centre (the star's tips); keep them in frame.
    margin = 1.2 * radius * float(scales.max()) + 1.0
    centres = _path(rng, spec, margin)
    def rgb(c: np.ndarray) -> tuple[int, int, int]:
        return tuple(int(v) for v in np.rint(c))

    return Subject(shape, texture, rgb(colour), rgb(colour2), rgb(background), radius, centres,
                   angle0 + s * turn, scales)


# --- rendering --------------------------------------------------------------------------------

def _box(u, v, half_u, half_v):
    """Exact signed distance to an axis-aligned box (local units)."""
    du, dv = np.abs(u) - half_u, np.abs(v) - half_v
    outside = np.hypot(np.maximum(du, 0), np.maximum(dv, 0))
    return outside + np.minimum(np.maximum(du, dv), 0)


def _polygon(r, a, n: int, circumradius: float):
    """Signed distance to the edge lines of a regular n-gon (exact inside, close outside)."""
    sector = 2 * math.pi / n
    folded = np.mod(a, sector) - sector / 2  # angle from the nearest edge normal
    return r * np.cos(folded) - circumradius * math.cos(math.pi / n)


def _star(r, a, points: int = 5, outer: float = 1.2, inner: float = 0.5):
    sector = 2 * math.pi / points
    b = np.abs(np.mod(a + sector / 2, sector) - sector / 2)  # 0 at a tip, sector/2 between tips
    px, py = r * np.cos(b), r * np.sin(b)
    ax, ay = outer, 0.0  # tip
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)  # notch
    ex, ey = bx - ax, by - ay
    norm = math.hypot(ex, ey)
    nx, ny = ey / norm, -ex / norm  # points away from the centre
    if nx * ax + ny * ay < 0:
        nx, ny = -nx, -ny
    return (px - ax) * nx + (py - ay) * ny


def shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) in local units, where the subject has radius ~1."""
    if shape == "square":
        return _box(u, v, 0.85, 0.85)
    if shape == "cross":
        return np.minimum(_box(u, v, 1.0, 0.33), _box(u, v, 0.33, 1.0))
    r = np.hypot(u, v)
    if shape == "circle":
        return r - 1.0
    if shape == "ring":
        return np.abs(r - 0.72) - 0.3
    a = np.arctan2(v, u)
    if shape == "triangle":
        return _polygon(r, a, 3, 1.2)
    if shape == "hexagon":
        return _polygon(r, a, 6, 1.0)
    if shape == "star":
        return _star(r, a)
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Weight of the second colour in [0, 1], in the subject's own (rotating) coordinates."""
    if texture == "stripes":
        w = np.sin(2 * math.pi * u / 0.9)  # about 4 stripes across: coarse enough for 8x8 latents
    elif texture == "checker":
        w = np.sin(2 * math.pi * u / 1.2) * np.sin(2 * math.pi * v / 1.2)
    else:
        return np.zeros_like(u)
    return np.clip(0.5 + 2.0 * w, 0.0, 1.0)  # steep but not a hard step: mild anti-aliasing


def render(subject: Subject, height: int, width: int, frames=None, origin: tuple[int, int] = (0, 0)):
    """Draw the clip (or a window of it): frame indices `frames` (default all) and the
    height x width window whose top-left pixel is `origin` = (y0, x0) of the full canvas.

    Returns uint8 (T, H, W, 3) frames and float32 (T, H, W) subject coverage.
    """
    idx = np.arange(len(subject.angles)) if frames is None else np.asarray(frames)
    f32 = np.float32  # float32 throughout: twice as fast, and plenty for 8-bit pixels
    y0, x0 = origin
    ys = (np.arange(height, dtype=f32) + f32(y0 + 0.5))[None, :, None]  # pixel centres, (1, H, 1)
    xs = (np.arange(width, dtype=f32) + f32(x0 + 0.5))[None, None, :]  # (1, 1, W)

    def per_frame(values) -> np.ndarray:  # (T,) -> (T, 1, 1), the frames drawn
        return np.asarray(values, f32)[idx][:, None, None]

    cx, cy = per_frame(subject.centres[:, 0]), per_frame(subject.centres[:, 1])
    ang, size = per_frame(subject.angles), per_frame(subject.radius * subject.scales)  # px per unit
    dx, dy = xs - cx, ys - cy  # (T, H, W) by broadcasting
    cos, sin = np.cos(ang), np.sin(ang)
    u, v = (cos * dx + sin * dy) / size, (cos * dy - sin * dx) / size  # rotated by -angle
    dist_px = shape_distance(subject.shape, u, v) * size
    coverage = np.clip(f32(0.5) - dist_px, 0.0, 1.0)[..., None]  # edge ~1 px wide, (T, H, W, 1)
    fill = np.asarray(subject.colour, f32)
    if subject.texture != "plain":
        mix = _texture(subject.texture, u, v)[..., None]
        fill = fill + mix * (np.asarray(subject.colour2, f32) - fill)  # (T, H, W, 3)
    background = np.asarray(subject.background, f32)
    frames_f = background + coverage * (fill - background)
    return np.rint(frames_f).astype(np.uint8), coverage[..., 0]


# --- clips and batches ------------------------------------------------------------------------

def make_clip(rng: np.random.Generator, spec: ClipSpec = ClipSpec()) -> Clip:
    subject = sample_subject(rng, spec)
    frames, coverage = render(subject, spec.height, spec.width)
    return Clip(frames, coverage, subject)


def make_clips(seed: int, count: int, spec: ClipSpec = ClipSpec(), stream: int = 0,
               start: int = 0) -> list[Clip]:
    """Clips start .. start+count-1 of (seed, stream)."""
    return [make_clip(clip_rng(seed, stream, start + i), spec) for i in range(count)]


def clip_batch(seed: int, count: int, spec: ClipSpec = ClipSpec(), stream: int = 0,
               start: int = 0) -> np.ndarray:
    """uint8 (N, T, H, W, 3): the frames of `make_clips(...)`."""
    return np.stack([c.frames for c in make_clips(seed, count, spec, stream, start)])


def random_crop(rng: np.random.Generator, spec: ClipSpec, frames: int, size: int) -> np.ndarray:
    """uint8 (frames, size, size, 3): a window of a full `spec` clip, for training a fully
    convolutional model on less than the whole clip. The window starts at a random frame and
    is placed around the subject (with jitter), so most crops contain edges and motion."""
    subject = sample_subject(rng, spec)
    t0 = int(rng.integers(0, spec.frames - frames + 1))
    cx, cy = subject.centres[t0]
    y0 = int(np.clip(round(cy - size / 2 + rng.uniform(-0.5, 0.5) * size), 0, spec.height - size))
    x0 = int(np.clip(round(cx - size / 2 + rng.uniform(-0.5, 0.5) * size), 0, spec.width - size))
    clip, _ = render(subject, size, size, frames=np.arange(t0, t0 + frames), origin=(y0, x0))
    return clip
