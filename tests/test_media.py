"""Behaviour of runtime.media: image loading, video round trips, atomic writes, user errors."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
from PIL import Image, ImageSequence

from runtime import files, media
from runtime.errors import WanError
from runtime.media import check_output, load_image, output_kind, read_video, write_video

T, H, W = 9, 48, 64


def smooth_frames(t: int = T, h: int = H, w: int = W) -> np.ndarray:
    """A slowly moving colour gradient: easy for H.264, so PSNR measures our pipeline."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = [
        np.stack(
            [
                128 + 100 * np.sin(x / 15 + i / 3),
                128 + 100 * np.cos(y / 11 + i / 5),
                128 + 100 * np.sin((x + y) / 20 - i / 4),
            ],
            axis=-1,
        )
        for i in range(t)
    ]
    return np.stack(frames).round().astype(np.uint8)


def blocky_frames(t: int = T, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Distinct frames of 8x8 blocks from a 40-colour palette: fits GIF's 256 colours exactly."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (40, 3), dtype=np.uint8)
    index = rng.integers(0, len(palette), (t, h // 8, w // 8))
    return palette[index].repeat(8, axis=1).repeat(8, axis=2)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse else float("inf")


def snapshot(path):
    """Everything observable about an output: bytes of a file, or names and bytes in a folder."""
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else None
                for p in sorted(path.rglob("*"))}
    return path.read_bytes()


NAMES = {"mp4": "out.mp4", "gif": "out.gif", "png": "frames"}


# --- output_kind / check_output ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kind",
    [
        ("video.mp4", "mp4"),
        ("VIDEO.MP4", "mp4"),
        ("anim.gif", "gif"),
        ("frames", "png"),
        ("frames/", "png"),
        ("some/dir/frames", "png"),
    ],
)
def test_output_kind_from_name(name, kind):
    assert output_kind(name) == kind


def test_existing_folder_is_png_even_with_a_suffix(tmp_path):
    folder = tmp_path / "run.v2"
    folder.mkdir()
    assert output_kind(folder) == "png"


@pytest.mark.parametrize("name", ["clip.avi", "clip.webm", "frame.png", "x.mp4.tmp"])
def test_output_kind_rejects_unsupported_suffix(name):
    with pytest.raises(WanError, match="unsupported format") as err:
        output_kind(name)
    message = str(err.value)
    assert name in message and ".mp4" in message and ".gif" in message
    assert "\n" not in message


def test_check_output_accepts_new_path(tmp_path):
    assert check_output(tmp_path / "new.mp4", overwrite=False) == tmp_path / "new.mp4"


def test_check_output_missing_parent(tmp_path):
    parent = tmp_path / "no" / "such"
    with pytest.raises(WanError, match="does not exist") as err:
        check_output(parent / "out.mp4", overwrite=False)
    assert str(parent) in str(err.value)


def test_check_output_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WanError, match="not a folder"):
        check_output(tmp_path / "file" / "out.mp4", overwrite=False)


def test_check_output_existing(tmp_path):
    out = tmp_path / "out.gif"
    out.write_bytes(b"GIF89a old")
    with pytest.raises(WanError, match="already exists; pass --overwrite"):
        check_output(out, overwrite=False)
    assert check_output(out, overwrite=True) == out
    assert out.read_bytes() == b"GIF89a old"  # checking never touches the file


# --- round trips ------------------------------------------------------------------------------


def test_mp4_round_trip(tmp_path):
    frames = smooth_frames()
    out = write_video(frames, tmp_path / "out.mp4", fps=16)
    assert out == tmp_path / "out.mp4"
    back = read_video(out)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert psnr(back, frames) > 30
    assert min(psnr(b, f) for b, f in zip(back, frames)) > 30
    with av.open(str(out)) as box:
        stream = box.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == 16
        assert stream.codec_context.pix_fmt == "yuv420p"


def test_mp4_rejects_odd_size(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(smooth_frames(h=47), tmp_path / "out.mp4")
    assert list(tmp_path.iterdir()) == []


def test_gif_round_trip(tmp_path):
    frames = blocky_frames()
    out = write_video(frames, tmp_path / "out.gif", fps=16)
    np.testing.assert_array_equal(read_video(out), frames)
    with Image.open(out) as img:
        assert img.n_frames == T
        assert img.info["loop"] == 0
        assert img.info["duration"] == pytest.approx(1000 / 16, abs=10)  # GIF ticks are 10 ms


def test_gif_smooth_content_is_close(tmp_path):
    frames = smooth_frames()
    back = read_video(write_video(frames, tmp_path / "out.gif"))
    assert back.shape == frames.shape
    assert psnr(back, frames) > 25  # 256-colour palette per frame


def test_png_round_trip(tmp_path):
    frames = smooth_frames()
    out = write_video(frames, tmp_path / "frames")
    assert out.is_dir()
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:04d}.png" for i in range(T)]
    np.testing.assert_array_equal(read_video(out), frames)


def test_png_into_trailing_separator_name(tmp_path):
    out = write_video(blocky_frames(t=2), f"{tmp_path}/frames/")
    assert out == tmp_path / "frames" and len(list(out.iterdir())) == 2


@pytest.mark.parametrize("kind", ["mp4", "gif", "png"])
def test_success_leaves_no_temporaries(tmp_path, kind):
    write_video(blocky_frames(), tmp_path / NAMES[kind])
    assert [p.name for p in tmp_path.iterdir()] == [NAMES[kind]]


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 16, 16, 3), np.float32),  # dtype
        np.zeros((16, 16, 3), np.uint8),  # ndim
        np.zeros((2, 16, 16, 4), np.uint8),  # channels
        np.zeros((0, 16, 16, 3), np.uint8),  # no frames
    ],
)
def test_write_video_rejects_bad_frames(tmp_path, bad):
    with pytest.raises(ValueError):
        write_video(bad, tmp_path / "out.mp4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fps", [0, -5, 12.5])
def test_write_video_rejects_bad_fps(tmp_path, fps):
    with pytest.raises(WanError, match="fps"):
        write_video(blocky_frames(t=2), tmp_path / "out.gif", fps=fps)


def test_write_video_user_errors_come_before_encoding(tmp_path):
    with pytest.raises(WanError, match="unsupported format"):
        write_video(blocky_frames(t=2), tmp_path / "out.avi")
    with pytest.raises(WanError, match="does not exist"):
        write_video(blocky_frames(t=2), tmp_path / "missing" / "out.mp4")
    assert list(tmp_path.iterdir()) == []


def test_read_video_missing(tmp_path):
    with pytest.raises(WanError, match="does not exist"):
        read_video(tmp_path / "nope.mp4")


# --- overwrite and atomicity ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mp4", "gif", "png"])
def test_existing_output_kept_without_overwrite(tmp_path, kind):
    out = write_video(blocky_frames(seed=1), tmp_path / NAMES[kind])
    before = snapshot(out)
    with pytest.raises(WanError, match="already exists; pass --overwrite"):
        write_video(blocky_frames(seed=2), out)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == [NAMES[kind]]


@pytest.mark.parametrize("kind", ["mp4", "gif", "png"])
def test_overwrite_replaces_output(tmp_path, kind):
    old = blocky_frames(t=T, seed=1)
    new = blocky_frames(t=4, seed=2)  # fewer frames: stale PNGs must not survive
    out = write_video(old, tmp_path / NAMES[kind])
    write_video(new, out, overwrite=True)
    back = read_video(out)
    assert back.shape == new.shape
    if kind == "mp4":
        assert psnr(back, new) > psnr(back, old[:4])
    else:
        np.testing.assert_array_equal(back, new)
    assert [p.name for p in tmp_path.iterdir()] == [NAMES[kind]]


@pytest.mark.parametrize("case", ["file named like a folder", "folder with other files", "video name on a folder",
                                  "text named .mp4", "gif content named .mp4", "frames and a subfolder"])
def test_overwrite_replaces_only_what_it_wrote(tmp_path, case):
    """--overwrite replaces a video file or a folder holding only frames; anything else stays."""
    out = tmp_path / {"file named like a folder": "frames", "folder with other files": "frames",
                      "video name on a folder": "clip.mp4", "text named .mp4": "notes.mp4",
                      "gif content named .mp4": "x.mp4", "frames and a subfolder": "frames"}[case]
    if case == "file named like a folder":
        out.write_bytes(b"not a folder")
    elif case in ("folder with other files", "frames and a subfolder"):
        write_video(blocky_frames(t=2), out)
        if case == "folder with other files":
            (out / "thesis.tex").write_text("three years of work")
        else:
            (out / "sub").mkdir()
    elif case == "video name on a folder":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "text named .mp4":
        out.write_text("my notes")
    else:
        write_video(blocky_frames(t=2), tmp_path / "x.gif")
        (tmp_path / "x.gif").rename(out)
    before = snapshot(out)
    with pytest.raises(WanError, match="not replaced"):
        write_video(blocky_frames(t=2), out, overwrite=True)
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_a_link_not_its_target(tmp_path):
    target = tmp_path / "elsewhere.mp4"
    write_video(blocky_frames(t=2), target)
    before = target.read_bytes()
    link = tmp_path / "link.mp4"
    link.symlink_to(target)
    write_video(blocky_frames(t=3, seed=4), link, overwrite=True)
    assert not link.is_symlink() and read_video(link).shape[0] == 3
    assert target.read_bytes() == before


def test_output_that_appears_meanwhile_is_kept(tmp_path, monkeypatch):
    """The name is checked before the (slow) encode and taken with a rename that never
    replaces: a file made in between by someone else survives, and the new video is dropped."""
    out = tmp_path / "out.mp4"

    def frames():
        yield blocky_frames(t=2)
        out.write_text("made by someone else meanwhile")
        yield blocky_frames(t=2, seed=3)

    with pytest.raises(WanError, match="appeared while this run was working"):
        write_video(frames(), out)
    assert out.read_text() == "made by someone else meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_current_directory_is_never_replaced(tmp_path, monkeypatch):
    write_video(blocky_frames(t=2), tmp_path / "frames")
    monkeypatch.chdir(tmp_path / "frames")
    with pytest.raises(WanError, match="current directory"):
        write_video(blocky_frames(t=2), ".", overwrite=True)
    with pytest.raises(WanError, match="already exists"):
        check_output(".", overwrite=False)
    assert len(list((tmp_path / "frames").iterdir())) == 2


def failing_after(monkeypatch, owner, name, calls, exc):
    """Make owner.name raise `exc` on its `calls`-th call: a crash partway through writing."""
    original = getattr(owner, name)
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] >= calls:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("kind", ["mp4", "gif", "png"])
@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_no_partial_output(tmp_path, monkeypatch, kind, exc, existing):
    out = tmp_path / NAMES[kind]
    before = snapshot(write_video(blocky_frames(seed=1), out)) if existing else None
    # The MP4 path builds frames with PyAV, the others with Pillow: break the 4th frame.
    if kind == "mp4":
        failing_after(monkeypatch, av.VideoFrame, "from_ndarray", 4, exc)
    else:
        failing_after(monkeypatch, Image, "fromarray", 4, exc)
    with pytest.raises(type(exc)):
        write_video(blocky_frames(seed=2), out, overwrite=True)
    if existing:
        assert snapshot(out) == before
        assert [p.name for p in tmp_path.iterdir()] == [NAMES[kind]]
    else:
        assert list(tmp_path.iterdir()) == []


def test_png_swap_failure_restores_old_folder(tmp_path, monkeypatch):
    out = write_video(blocky_frames(seed=1), tmp_path / "frames")
    before = snapshot(out)
    real_rename = files.rename_noreplace

    def rename(src, dst):
        # Let the old folder be set aside, then fail moving the new one in.
        if ".partial." in str(src):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(files, "rename_noreplace", rename)
    with pytest.raises(OSError, match="rename failed"):
        write_video(blocky_frames(seed=2), out, overwrite=True)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]


# --- load_image -------------------------------------------------------------------------------


def stripes(width: int, height: int) -> Image.Image:
    """Three vertical stripes, red | green | blue, each a third of the width."""
    img = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    img[:, :third, 0] = 255
    img[:, third : 2 * third, 1] = 255
    img[:, 2 * third :, 2] = 255
    return Image.fromarray(img)


def test_load_image_covers_and_centre_crops_landscape(tmp_path):
    path = tmp_path / "wide.png"
    stripes(300, 100).save(path)
    # Cover 32x32: scaled to 96x32, the centre 32 columns are the green stripe.
    img = load_image(path, 32, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    centre = img[:, 4:-4].astype(int)
    assert (centre[..., 1] > 200).all() and (centre[..., [0, 2]] < 60).all()


def test_load_image_covers_and_centre_crops_portrait(tmp_path):
    path = tmp_path / "tall.png"
    stripes(300, 100).rotate(90, expand=True).save(path)  # 100 wide, 300 tall
    img = load_image(path, 16, 48)  # wide target from a tall image: crop top and bottom
    assert img.shape == (16, 48, 3)
    assert (img[..., 1] > 200).all() and (img[..., [0, 2]] < 60).all()


def test_load_image_upscales_small_input(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(smooth_frames(t=1, h=10, w=20)[0]).save(path)
    assert load_image(path, 48, 64).shape == (48, 64, 3)


def test_load_image_same_size_is_unchanged(tmp_path):
    frame = smooth_frames(t=1)[0]
    path = tmp_path / "exact.png"
    Image.fromarray(frame).save(path)
    np.testing.assert_array_equal(load_image(path, H, W), frame)


def test_load_image_uses_bicubic_cover_crop(tmp_path):
    source = Image.fromarray(smooth_frames(t=1, h=90, w=160)[0])
    path = tmp_path / "ref.png"
    source.save(path)
    # 90x160 covering 48x48: scale 48/90 gives 85x48, whose columns 18..66 are the output; the
    # source box behind them is resampled directly.
    sx = 160 / 85
    expected = source.resize((48, 48), Image.Resampling.BICUBIC, box=(18 * sx, 0, 66 * sx, 90))
    np.testing.assert_array_equal(load_image(path, 48, 48), np.asarray(expected))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_load_image_any_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / ("img.tiff" if mode == "CMYK" else "img.png")
    Image.fromarray(smooth_frames(t=1)[0]).convert(mode).save(path)
    img = load_image(path, 16, 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8


def test_load_image_missing(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(WanError) as err:
        load_image(path, 16, 16)
    assert str(err.value) == f"reference image '{path}' does not exist"


def test_load_image_directory(tmp_path):
    with pytest.raises(WanError, match="is a directory"):
        load_image(tmp_path, 16, 16)


def test_load_image_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, not a picture")
    with pytest.raises(WanError, match="cannot be read as an image") as err:
        load_image(path, 16, 16)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_image_truncated(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(smooth_frames(t=1)[0]).save(good)
    bad = tmp_path / "truncated.png"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(WanError, match="cannot be read as an image"):
        load_image(bad, 16, 16)


def test_load_image_rejects_bad_size(tmp_path):
    path = tmp_path / "ok.png"
    Image.fromarray(smooth_frames(t=1)[0]).save(path)
    with pytest.raises(WanError, match="height and width"):
        load_image(path, 0, 16)


def test_write_video_takes_chunks_as_they_come(tmp_path):
    """A generator of chunks (as the streaming decoder yields them) writes the same video."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    taken = []

    def chunks():
        for start, stop in ((0, 1), (1, 5), (5, 9)):
            taken.append(stop)
            yield frames[start:stop]

    out = write_video(chunks(), tmp_path / "frames")
    assert taken == [1, 5, 9]
    np.testing.assert_array_equal(read_video(out), frames)


# --- frame rates the containers store, frames that read back ------------------------------------


@pytest.mark.parametrize("kind, fps", [("mp4", 0), ("mp4", 121), ("gif", 51), ("png", 10**9), ("gif", 16.0),
                                       ("mp4", True)])
def test_fps_outside_what_the_container_stores_is_refused(tmp_path, kind, fps):
    with pytest.raises(WanError, match="is not allowed: use a whole number from 1 to"):
        write_video(blocky_frames(t=2), tmp_path / NAMES[kind], fps=fps)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fps", [1, 16, 24, 30, 120])
def test_mp4_decodes_to_exactly_the_frames_at_their_times(tmp_path, fps):
    frames = smooth_frames(t=T)
    out = write_video(frames, tmp_path / "out.mp4", fps=fps)
    with av.open(str(out)) as box:
        stream = box.streams.video[0]
        times = [float(f.pts * f.time_base) for f in box.decode(stream)]
        assert stream.average_rate == fps
    assert times == pytest.approx([i / fps for i in range(T)], abs=1e-6)
    assert psnr(read_video(out), frames) > 30  # lossy, and rate control spends less per frame at 120 fps


@pytest.mark.parametrize("fps", [16, 25, 50, 7])
def test_gif_decodes_to_exactly_the_frames_given(tmp_path, fps):
    """GIF keeps delays in 1/100 s: the per-frame delays vary so the clip lasts T/fps (16 fps
    used to play at 16.7), and frames merged because they repeat come back at read time."""
    frames = blocky_frames(t=T)
    frames[3] = frames[2]  # a repeated frame, as a still subject gives
    frames[4] = frames[2]
    out = write_video(frames, tmp_path / "out.gif", fps=fps)
    with Image.open(out) as img:
        delays = [f.info["duration"] for f in ImageSequence.Iterator(img)]
    assert len(delays) == T - 2 and sum(delays) == 10 * round(100 * T / fps)
    np.testing.assert_array_equal(read_video(out, fps=fps), frames)


def test_png_frames_read_back_exactly(tmp_path):
    frames = smooth_frames(t=T)
    np.testing.assert_array_equal(read_video(write_video(frames, tmp_path / "frames")), frames)


# --- reference images that would hang or exhaust memory ----------------------------------------


def test_huge_and_degenerate_images_are_refused_from_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 10_000)
    big = tmp_path / "big.png"
    Image.new("RGB", (101, 100)).save(big)
    with pytest.raises(WanError, match="is 101x100 pixels: use at most 0 megapixels"):
        load_image(big, 16, 16)
    line = tmp_path / "line.png"
    Image.new("RGB", (1, 17)).save(line)
    with pytest.raises(WanError, match=r"is 1x17 pixels: .* aspect ratio up to 16:1"):
        load_image(line, 16, 16)
    Image.new("RGB", (1, 16)).save(line)
    assert load_image(line, 16, 16).shape == (16, 16, 3)


def test_cover_crop_resamples_only_the_visible_box(tmp_path):
    """A wide image covering a small square is not first scaled whole (a 1x100000 image took
    2 GB that way): memory is the output's, and the result is the centre of the cover scale."""
    wide = stripes(3000, 200)
    path = tmp_path / "wide.png"
    wide.save(path)
    img = load_image(path, 32, 32)
    assert (img[..., 1] > 200).all() and (img[..., [0, 2]] < 60).all()


def test_fifo_image_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(WanError, match="is a FIFO"):
        load_image(fifo, 16, 16)


def test_load_image_applies_exif_orientation(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise) is read
    upright, as diffusers' load_image and image viewers show it."""
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    Image.fromarray(img).save(path, exif=exif, quality=95)
    upright = load_image(path, fit="none")
    assert upright.shape == (40, 20, 3)  # turned: portrait
    assert upright[:20].mean() > 200 and upright[20:].mean() < 50  # the white half is now on top
