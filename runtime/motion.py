"""How the subject moves: a user's motion -> the DiT's `motion` input (numpy only).

The DiT is told where the reference's content goes in every latent frame. Its cross-attention
keys (the reference patches) are rotated by RoPE not at their own grid position but where the
motion carries them by that frame, so a video token finds the reference patch that belongs at
its place (export/dit.py). Without it the DiT hedges over where the subject may go and the
outline frays (README, "Motion as an input").

A motion is described like the training clips' (export/synthetic.py):

    move   where the subject's centre ends, from where it starts: (right, down) in fractions of
           the frame's shorter side
    bend   sideways offset of the path's midpoint from the straight line, same unit; > 0 bulges
           to the right of the direction of travel (clockwise), < 0 to the left
    turn   rotation over the clip in degrees, > 0 clockwise on screen
    zoom   the subject's final scale (it grows geometrically, the same factor every frame)

The path is a quadratic Bezier from the subject's centre in the reference (`subject_centre`,
the centroid of everything that is not the plain background) and is sampled at the middle
video frame of each latent frame (latent frame f >= 1 holds video frames 4f-3 .. 4f).

    motion_maps(motion, centre, frames, height, width, geometry) -> float32 (F, 2, 3)

Row f is the affine map (x, y, 1) -> (x', y') on the DiT's token grid (token (i, j) sits at
x = j, y = i) that carries reference content to latent frame f; the identity map says "stays
where it is" and is also the CFG branch without conditioning.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from runtime.errors import WanError
from runtime.stages import Geometry

# What the bundled model was trained on (export/synthetic.ClipSpec; tests hold them equal):
# the limits a request is checked against, and the ranges `random_motion` draws from.
MAX_MOVE = 0.5  # training clips travel 0.15 to 0.45
TRAVEL = (0.15, 0.45)
MAX_BEND = 0.15  # training: up to 0.3 x travel
BEND_FRACTION = 0.3
P_CURVED = 0.5
MAX_TURN = 90.0
P_TURN = 0.5
MAX_ZOOM = 1.5
P_ZOOM = 0.3
FOREGROUND_DISTANCE = 50.0  # RGB distance from the background (the clips keep >= 100)
MOTION_STREAM = 1  # numpy seed sequence [seed, 1] draws the random motion of a seed


@dataclass(frozen=True)
class Motion:
    move: tuple[float, float] = (0.0, 0.0)
    bend: float = 0.0
    turn: float = 0.0
    zoom: float = 1.0

    def check(self) -> "Motion":
        """Raise a one-line WanError for a value outside what the model was trained on."""
        try:
            dx, dy = self.move
        except (TypeError, ValueError):
            raise WanError(f"move {self.move!r} is not allowed: use two numbers (dx, dy)") from None
        values = (dx, dy, self.bend, self.turn, self.zoom)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                   for v in values):
            raise WanError(f"motion {self} is not allowed: every value must be a finite number")
        if math.hypot(dx, dy) > MAX_MOVE:
            raise WanError(f"move {dx:g},{dy:g} is not allowed: the distance may be at most {MAX_MOVE} "
                           "of the frame's shorter side")
        if abs(self.bend) > MAX_BEND:
            raise WanError(f"bend {self.bend:g} is not allowed: use -{MAX_BEND} to {MAX_BEND}")
        if self.bend and not (dx or dy):
            raise WanError(f"bend {self.bend:g} needs a move (a bend is sideways to the direction of travel)")
        if abs(self.turn) > MAX_TURN:
            raise WanError(f"turn {self.turn:g} is not allowed: use -{MAX_TURN:g} to {MAX_TURN:g} degrees")
        if not 1 / MAX_ZOOM - 1e-9 <= self.zoom <= MAX_ZOOM + 1e-9:
            raise WanError(f"zoom {self.zoom:g} is not allowed: use {1 / MAX_ZOOM:.3g} to {MAX_ZOOM:g}")
        return self

    def describe(self) -> str:
        """The wan-run options that give this motion (rounded)."""
        dx, dy = self.move
        return (f"--move {dx:.3f},{dy:.3f} --bend {self.bend:.3f} --turn {self.turn:.1f} "
                f"--zoom {self.zoom:.3f}")

    def path(self, centre: tuple[float, float], s: np.ndarray, unit: float):
        """Centres (N, 2) in pixels (x, y), turns (N,) in radians and scales (N,) at clip times
        s in [0, 1], starting from `centre`; `unit` is the frame's shorter side in pixels."""
        start = np.asarray(centre, np.float64)
        d = np.asarray(self.move, np.float64) * unit
        end = start + d
        dist = float(np.hypot(*d))
        normal = np.array([-d[1], d[0]]) / dist if dist > 0 else np.zeros(2)  # right of travel
        # The Bezier's midpoint is halfway between the chord's midpoint and the control point.
        control = (start + end) / 2 + 2 * self.bend * unit * normal
        s = np.asarray(s, np.float64)[:, None]
        centres = (1 - s) ** 2 * start + 2 * (1 - s) * s * control + s**2 * end
        return centres, s[:, 0] * math.radians(self.turn), np.exp(s[:, 0] * math.log(self.zoom))


def latent_frame_times(frames: int, geometry: Geometry) -> np.ndarray:
    """Clip time in [0, 1] of each latent frame: video frame 0, then the middle of each group of
    `temporal_stride` video frames."""
    ts, n = geometry.temporal_stride, geometry.frames_to_latent(frames)
    t = np.array([0.0] + [ts * f - (ts - 1) / 2 for f in range(1, n)])
    return t / max(frames - 1, 1)


def identity_maps(latent_frames: int) -> np.ndarray:
    """(F, 2, 3) identity maps: the reference stays where it is (and CFG's null branch)."""
    return np.tile(np.eye(2, 3, dtype=np.float32), (latent_frames, 1, 1))


def motion_maps(motion: Motion, centre: tuple[float, float], frames: int, height: int, width: int,
                geometry: Geometry) -> np.ndarray:
    """float32 (F, 2, 3): per latent frame, the similarity map of the token grid that carries the
    subject from frame 0 (centre `centre`, pixels (x, y)) to its place in that frame."""
    centres, turns, scales = motion.path(centre, latent_frame_times(frames, geometry), min(height, width))
    tok = np.asarray(geometry.pixels_per_token[::-1], np.float64)  # (x, y) pixels per token
    to_grid = lambda p: p / tok - 0.5  # noqa: E731 - pixel coordinates -> token grid (centres)
    c0 = to_grid(centres[0])
    maps = np.zeros((len(turns), 2, 3), np.float64)
    for f, (c, a, k) in enumerate(zip(to_grid(centres), turns, scales)):
        # Token units are not square when the token is not: scale x and y back to pixels first.
        rot = k * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        lin = np.diag(1 / tok) @ rot @ np.diag(tok)
        maps[f, :, :2] = lin
        maps[f, :, 2] = c - lin @ c0
    return maps.astype(np.float32)


# --- the subject in a reference image ---------------------------------------------------------

def background_colour(frame: np.ndarray, border: int = 2) -> np.ndarray:
    """Median RGB of the outer `border` pixels: the plain background, even where the subject
    touches an edge."""
    f = np.asarray(frame, np.float64)
    ring = np.concatenate([f[:border].reshape(-1, 3), f[-border:].reshape(-1, 3),
                           f[:, :border].reshape(-1, 3), f[:, -border:].reshape(-1, 3)])
    return np.median(ring, axis=0)


def foreground_mask(frame: np.ndarray, background: np.ndarray | None = None,
                    threshold: float = FOREGROUND_DISTANCE) -> np.ndarray:
    """bool (H, W): pixels whose colour is more than `threshold` from the background."""
    bg = background_colour(frame) if background is None else background
    return np.linalg.norm(np.asarray(frame, np.float64) - bg, axis=-1) > threshold


def centroid(mask: np.ndarray) -> np.ndarray:
    """(y, x) of a mask's pixels; NaNs for an empty mask."""
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean(), xs.mean()]) if len(ys) else np.full(2, np.nan)


def subject_centre(image: np.ndarray) -> tuple[tuple[float, float], float]:
    """The subject's centre (x, y) in pixels (pixel centres at +0.5) and its radius (of a disc
    of the same area), from a reference on a plain background; the image centre and a quarter of
    its shorter side when nothing stands out from the background."""
    mask = foreground_mask(image)
    H, W = mask.shape
    if not mask.any():
        return (W / 2, H / 2), min(H, W) / 4
    y, x = centroid(mask)
    return (float(x) + 0.5, float(y) + 0.5), math.sqrt(mask.sum() / math.pi)


def random_motion(rng: np.random.Generator, centre: tuple[float, float], radius: float,
                  height: int, width: int) -> Motion:
    """A motion like the training clips': a random direction and distance, sometimes bent,
    turned or zoomed, that keeps the subject inside the frame (tried 32 times, then the
    longest move along a random direction that fits, else none)."""
    unit = min(height, width)
    turn = float(rng.uniform(-MAX_TURN, MAX_TURN)) if rng.random() < P_TURN else 0.0
    zoom = float(math.exp(rng.uniform(-1, 1) * math.log(MAX_ZOOM))) if rng.random() < P_ZOOM else 1.0
    margin = 1.2 * radius * max(1.0, zoom)
    lo, hi = np.array([margin, margin]), np.array([width - margin, height - margin])
    s = np.linspace(0, 1, 17)

    def fits(m: Motion) -> bool:
        centres = m.path(centre, s, unit)[0]
        return bool(np.all(centres >= lo) and np.all(centres <= hi))

    for _ in range(32):
        angle = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(*TRAVEL)
        bend = rng.uniform(-BEND_FRACTION, BEND_FRACTION) * dist if rng.random() < P_CURVED else 0.0
        m = Motion((dist * math.cos(angle), dist * math.sin(angle)), bend, turn, zoom)
        if fits(m):
            return m
    angle = rng.uniform(0, 2 * math.pi)
    for dist in np.linspace(TRAVEL[1], 0.0, 10):
        m = Motion((dist * math.cos(angle), dist * math.sin(angle)), 0.0, turn, zoom)
        if fits(m):
            return m
    return Motion((0.0, 0.0), 0.0, turn, zoom)


def image_motion_maps(image: np.ndarray, motion: Motion | None, seed: int, frames: int,
                      geometry: Geometry) -> tuple[np.ndarray, Motion]:
    """The DiT's `motion` input for a reference image uint8 (H, W, 3): `motion` from the
    subject's centre in the image or, with None, a `random_motion` drawn from `seed` (its own
    stream: the initial noise of the same seed is not affected). Returns (maps (F, 2, 3), the
    motion used)."""
    H, W = image.shape[:2]
    centre, radius = subject_centre(image)
    if motion is None:
        motion = random_motion(np.random.default_rng([seed, MOTION_STREAM]), centre, radius, H, W)
    return motion_maps(motion.check(), centre, frames, H, W, geometry), motion
