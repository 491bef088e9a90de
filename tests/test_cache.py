"""Step caching (runtime/cache.py): the rules on synthetic velocities, then through the runtime on
the tiny seed artifacts and the tiny A14B pair (one cache state per expert)."""

import numpy as np
import pytest

from runtime import Pipeline
from runtime.cache import CacheSetting, StepCache, parse_cache
from runtime.errors import WanError


@pytest.mark.parametrize("text", ["tea", "teacache:", "teacache:0", "teacache:-1", "magcache:nan",
                                  "magcache:inf", "magcache:11", "magcache:x", "magcache:0.1:2", 0.1])
def test_bad_cache_is_one_line(text):
    with pytest.raises(WanError, match=r"^cache .* is not allowed: use METHOD or METHOD:THRESHOLD") as err:
        parse_cache(text)
    assert "\n" not in str(err.value)


def test_parse_cache():
    assert parse_cache(None) is None and parse_cache("off") is None
    assert parse_cache("magcache:0.05") == CacheSetting("magcache", 0.05)
    assert parse_cache("teacache").threshold > 0
    assert parse_cache("teacache:2").describe() == "teacache:2"


def run_cache(setting: CacheSetting, steps: int, xs, vs, group_of=lambda i: "dit"):
    """Drive the cache as the loop does: step i sees input xs[i]; a DiT call returns vs[i]."""
    calls = []

    def velocity(x, i):
        calls.append(i)
        return vs[i]

    cache = StepCache(setting, steps, np)
    cached = cache.wrap(velocity, group_of)
    out = [cached(xs[i], i) for i in range(steps)]
    return calls, cache.reused, out


def test_teacache_rule():
    steps = 10
    # the input changes by 5% a step: with threshold 0.12 two steps accumulate 0.10 (reused),
    # the third reaches 0.15 (run)
    xs = [np.full(4, 1.05**i, np.float32) for i in range(steps)]
    vs = [np.full(4, float(i), np.float32) for i in range(steps)]
    calls, reused, out = run_cache(CacheSetting("teacache", 0.12, max_skip=5, warmup=0.2), steps, xs, vs)
    assert calls[:2] == [0, 1]  # warm-up: the first 20%
    assert calls[-1] == steps - 1  # the last step always runs
    assert reused == [2, 3, 5, 6, 8]
    assert sorted(calls + reused) == list(range(steps))
    for i in reused:  # a reused step returns the last computed velocity
        assert out[i] is vs[max(c for c in calls if c < i)]
    # a constant input would be reused up to max_skip in a row
    calls, reused, _ = run_cache(CacheSetting("teacache", 0.12, max_skip=2, warmup=0.2), steps,
                                 [np.ones(4, np.float32)] * steps, vs)
    assert calls == [0, 1, 4, 7, 9] and reused == [2, 3, 5, 6, 8]


def test_magcache_rule():
    steps = 12
    xs = [np.ones(4, np.float32)] * steps
    # the velocity's magnitude drops 2% a step: predicted errors 0.02, then 0.02 + 0.0396 = 0.0596,
    # then 0.0596 + 0.0588 > 0.07: two reused, the third runs
    vs = [np.full(4, 0.98**i, np.float32) for i in range(steps)]
    calls, reused, _ = run_cache(CacheSetting("magcache", 0.07, max_skip=4, warmup=0.25), steps, xs, vs)
    assert calls[:3] == [0, 1, 2]
    assert reused == [3, 4, 6, 7, 9, 10]
    # a steady magnitude costs nothing: only max_skip stops it
    vs = [np.full(4, 1.0, np.float32)] * steps
    calls, reused, _ = run_cache(CacheSetting("magcache", 0.05, max_skip=3, warmup=0.25), steps, xs, vs)
    assert calls == [0, 1, 2, 6, 10, 11]
    # a large drop at every step: nothing is reused
    vs = [np.full(4, 0.5**i, np.float32) for i in range(steps)]
    calls, reused, _ = run_cache(CacheSetting("magcache", 0.05), steps, xs, vs)
    assert reused == []


def test_each_group_has_its_own_state():
    """A14B: the low-noise expert's first step runs (never reusing the high-noise expert's
    velocity), and it predicts from its own computed steps."""
    steps = 12
    plan = ["dit"] * 5 + ["dit_2"] * 7
    xs = [np.ones(4, np.float32)] * steps
    vs = [np.full(4, 1.0 if plan[i] == "dit" else 3.0, np.float32) for i in range(steps)]
    calls, reused, out = run_cache(CacheSetting("magcache", 0.05, max_skip=2, warmup=0.1), steps, xs, vs,
                                   plan.__getitem__)
    assert calls == [0, 1, 4, 5, 6, 9, 11]
    assert all(out[i][0] == (1.0 if plan[i] == "dit" else 3.0) for i in range(steps))


class Counted:
    """A stage that counts its calls (everything else passes through)."""

    def __init__(self, stage, counts: dict, name: str):
        self.stage, self.counts, self.name = stage, counts, name
        counts[name] = 0

    def __call__(self, **feeds):
        self.counts[self.name] += 1
        return self.stage(**feeds)

    def __getattr__(self, attr):
        return getattr(self.stage, attr)


def count_dit_calls(pipe, names=("dit", "dit_2")) -> dict:
    counts = {}
    for name in names:
        if name in pipe.stages:
            pipe.stages[name] = Counted(pipe.stages[name], counts, name)
    return counts


def test_seed_pipeline_cache(tiny_dir, reference_image):
    pipe = Pipeline.from_dir(tiny_dir)
    plain = pipe.generate(reference_image, steps=12, seed=3)
    counts = count_dit_calls(pipe)
    cached = pipe.generate(reference_image, steps=12, seed=3, cache="teacache:10")  # reuse all it may
    t = cached.timings
    assert counts["dit"] == t.dit_calls == 12 - len(t.reused) and len(t.dit) == 12
    assert t.reused == [2, 3, 5, 6, 8, 9]  # warm-up 2 (20% of 12), max 2 in a row, the last step runs
    assert "step cache: 6 DiT calls for 12 steps" in t.table()
    assert cached.frames.shape == plain.frames.shape and not np.array_equal(cached.frames, plain.frames)
    # off: the same video as without the option
    assert np.array_equal(pipe.generate(reference_image, steps=12, seed=3, cache="off").frames, plain.frames)
    with pytest.raises(WanError, match="cache 'fast' is not allowed"):
        pipe.generate(reference_image, cache="fast")


def test_a14b_cache_per_expert(wan_artifacts):
    pipe = Pipeline.from_dir(wan_artifacts("a14b"))
    counts = count_dit_calls(pipe)
    result = pipe.generate(prompt="a fox", frames=9, height=32, width=32, steps=10, guidance=4.0, guidance_2=3.0,
                           seed=1, cache="magcache:10")
    t = result.timings
    plan = t.experts
    switch = plan.index("dit_2")
    assert 0 < switch < 10
    # every expert's first step ran; the counts per stage add up to the steps not reused
    assert switch not in t.reused and 0 not in t.reused
    assert counts["dit"] + counts["dit_2"] == t.dit_calls < 10
    assert counts["dit"] == sum(1 for i in range(switch) if i not in t.reused)


def test_wan_run_cache_flag(tiny_dir, tmp_path):
    from PIL import Image

    from tests.conftest import run_cli

    image = tmp_path / "ref.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(image)
    r = run_cli("wan-run", tiny_dir, "--image", image, "--steps", 10, "--cache", "teacache:10", "-o", tmp_path / "a.gif")
    assert r.returncode == 0, r.stderr
    assert "cache teacache:10" in r.stdout and "step cache: 5 DiT calls for 10 steps" in r.stdout
    r = run_cli("wan-run", tiny_dir, "--image", image, "--cache", "magcache:0", "-o", tmp_path / "b.gif")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "cache 'magcache:0'" in r.stderr
    assert not (tmp_path / "b.gif").exists()
