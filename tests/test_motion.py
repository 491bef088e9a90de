"""runtime/motion.py: the user's motion, the training clips' motion and the DiT's motion maps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from export.synthetic import ClipSpec, make_clips, motion_of
from runtime import Pipeline, WanError
from runtime import motion as M
from runtime.stages import Geometry

GEOM = Geometry(latent_channels=16)
SPEC = ClipSpec()


def test_a_clips_motion_gives_back_its_path():
    """`motion_of` describes a training clip so that `Motion.path` redraws it exactly, and every
    training motion is within what a request may ask for."""
    s = np.linspace(0, 1, SPEC.frames)
    for clip in make_clips(0, 40, SPEC, stream=2):
        sub = clip.subject
        motion = motion_of(sub, SPEC).check()
        centres, turns, scales = motion.path(sub.centres[0], s, min(SPEC.height, SPEC.width))
        np.testing.assert_allclose(centres, sub.centres, atol=1e-9)
        np.testing.assert_allclose(turns, sub.angles - sub.angles[0], atol=1e-9)
        np.testing.assert_allclose(scales, sub.scales, rtol=1e-9)


def test_motion_maps_carry_the_subject_centre_along_the_path():
    motion = M.Motion(move=(0.3, -0.2), bend=0.05, turn=40.0, zoom=1.3)
    centre = (50.0, 70.0)
    maps = M.motion_maps(motion, centre, 17, 128, 128, GEOM)
    assert maps.shape == (5, 2, 3) and maps.dtype == np.float32
    np.testing.assert_allclose(maps[0], np.eye(2, 3), atol=1e-6)  # frame 0 is the reference
    times = M.latent_frame_times(17, GEOM)
    np.testing.assert_allclose(times, [0, 2.5 / 16, 6.5 / 16, 10.5 / 16, 14.5 / 16])
    centres, turns, scales = motion.path(centre, times, 128)
    tok = lambda p: np.asarray(p) / 16 - 0.5  # noqa: E731 - pixels -> token grid
    for f in range(5):
        np.testing.assert_allclose(maps[f] @ [*tok(centre), 1.0], tok(centres[f]), atol=1e-4)
        # the linear part is the frame's rotation and scale: a similarity
        lin = maps[f, :, :2]
        np.testing.assert_allclose(lin @ lin.T, scales[f] ** 2 * np.eye(2), atol=1e-5)
        assert math.atan2(lin[1, 0], lin[0, 0]) == pytest.approx(turns[f], abs=1e-5)
    still = M.motion_maps(M.Motion(), centre, 17, 128, 128, GEOM)
    np.testing.assert_array_equal(still, M.identity_maps(5))


def test_random_motion_is_seeded_in_range_and_keeps_the_subject_in_frame():
    centre, radius = (40.0, 90.0), 20.0
    draws = [M.random_motion(np.random.default_rng([seed, 1]), centre, radius, 128, 128)
             for seed in range(30)]
    assert draws[3] == M.random_motion(np.random.default_rng([3, 1]), centre, radius, 128, 128)
    assert len({d.move for d in draws}) == 30
    for d in draws:
        d.check()
        centres, _, _ = d.path(centre, np.linspace(0, 1, 17), 128)
        margin = 1.2 * radius * max(1.0, d.zoom)
        assert centres.min() >= margin - 1e-9 and centres.max() <= 128 - margin + 1e-9
        assert 0.15 - 1e-9 <= math.hypot(*d.move) <= 0.45 + 1e-9 or d.move == (0.0, 0.0)


def test_the_limits_are_those_of_the_training_clips():
    assert M.TRAVEL == SPEC.travel and M.MAX_ZOOM == SPEC.max_scale
    assert M.MAX_TURN == pytest.approx(math.degrees(SPEC.max_turn))
    assert M.P_CURVED == SPEC.p_curved and M.P_TURN == SPEC.p_rotate and M.P_ZOOM == SPEC.p_scale
    assert M.MAX_MOVE >= SPEC.travel[1] and M.MAX_BEND >= M.BEND_FRACTION * SPEC.travel[1]


@pytest.mark.parametrize("motion,needle", [
    (M.Motion(move=(float("nan"), 0.0)), "finite"),
    (M.Motion(move=(0.5, 0.5)), "at most 0.5"),
    (M.Motion(move=(0.2, 0.0), bend=0.2), "bend 0.2"),
    (M.Motion(turn=-91.0), "turn -91"),
    (M.Motion(zoom=0.5), "zoom 0.5"),
])
def test_bad_motions_are_refused_with_one_line(motion, needle):
    with pytest.raises(WanError, match=needle) as info:
        motion.check()
    assert "\n" not in str(info.value)


def test_subject_centre_is_found_in_the_reference():
    for clip in make_clips(1, 12, SPEC, stream=9):
        (x, y), radius = M.subject_centre(clip.reference)
        assert np.hypot(x - clip.subject.centres[0, 0], y - clip.subject.centres[0, 1]) < 1.5
        assert 0.5 * clip.subject.radius < radius < 1.5 * clip.subject.radius
    blank = np.full((64, 96, 3), 128, np.uint8)
    assert M.subject_centre(blank) == ((48.0, 32.0), 16.0)  # nothing stands out: the middle


def test_artifacts_without_a_motion_input_still_run(tiny_dir, reference_image, monkeypatch):
    """A DiT graph exported before the motion input: no motion is passed to it, and asking for
    one is a clear error rather than an ONNX Runtime complaint."""
    pipe = Pipeline.from_dir(tiny_dir)
    req = pipe.check_request(frames=5, steps=1)
    maps, _ = pipe.motion_maps(reference_image, req)
    ref = pipe.encode_reference(reference_image)
    assert set(pipe.dit_condition(ref, maps, 2.0)[1]) == {"ref_latent", "motion"}
    monkeypatch.setattr(type(pipe), "takes_motion", property(lambda self: False))
    assert set(pipe.dit_condition(ref, maps, 2.0)[1]) == {"ref_latent"}
    with pytest.raises(WanError, match="no motion input"):
        pipe.check_request(motion=M.Motion())
