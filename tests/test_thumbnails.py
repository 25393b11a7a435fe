"""Thumbnails: what they look like (size, orientation, first frame), that they stay within the image
limits, that broken or missing ones are rebuilt, and that they never hold a job back.

Real images drawn with Pillow, real files, the daemon and ``replay`` against the local backend.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
from pathlib import Path

import pytest
from PIL import Image
from test_daemon_pipeline import FAST, wait_materialized

from materializer.images import ImageLimits, ImageRejected, open_first_frame, validate_image
from materializer.layout import default_layout
from materializer.ledger import OutputFile
from materializer.materialize import Workspace
from materializer.options import DaemonOptions
from materializer.replay import replay
from materializer.thumbnails import FirstFrame, Thumbnails, fit, shrink, thumbnail_name
from materializer.tokens import StaticTokenProvider
from stella_devbackend.control import DevBackend

from helpers import async_wait_until, blank_png, gallery, ledger_events, running_daemon

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def halves(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    """An image whose left half is ``left`` and right half ``right``."""
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def close_to(pixel: object, colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    assert isinstance(pixel, tuple), pixel  # Image.getpixel of a multi-band image
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], colour, strict=True))


DEFAULT_LIMITS = ImageLimits()


def made(folder: Path, data: bytes, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Commit ``data`` as output ``name``, make its thumbnail as the pipeline does, and open the thumbnail."""
    (folder / name).write_bytes(data)
    thumbnails = Thumbnails(folder / ".thumbs", limits)
    frame = FirstFrame()
    validate_image(folder / name, limits, frame)
    assert thumbnails.save(name, frame), frame.error
    thumbnails.close()
    image = Image.open(folder / ".thumbs" / thumbnail_name(name))
    image.load()
    return image


# -- what a thumbnail is ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "expected"), [((1024, 1024), (256, 256)), ((768, 432), (256, 144)),
                                                ((300, 1000), (77, 256)), ((100, 40), (100, 40)),
                                                ((16384, 16), (256, 1))])
def test_the_longest_edge_is_256_and_the_aspect_is_kept(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert fit(*size) == expected
    small = shrink(Image.new("RGB", size, RED))
    assert (small.size, small.mode) == (expected, "RGB")


def test_a_thumbnail_is_a_webp_of_the_image(tmp_path: Path) -> None:
    thumb = made(tmp_path, encoded(halves((1000, 500), RED, BLUE), "PNG"), "job_0.png")
    assert (thumb.format, thumb.size, getattr(thumb, "n_frames", 1)) == ("WEBP", (256, 128), 1)
    assert close_to(thumb.getpixel((20, 64)), RED) and close_to(thumb.getpixel((236, 64)), BLUE)
    assert os.stat(tmp_path / ".thumbs" / "job_0.webp").st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / ".thumbs").st_mode & 0o777 == 0o700
    assert [p.name for p in (tmp_path / ".thumbs").iterdir()] == ["job_0.webp"]  # nothing partial left


def test_transparency_is_kept(tmp_path: Path) -> None:
    image = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 200, 400))
    thumb = made(tmp_path, encoded(image, "PNG"), "job_0.png")
    assert thumb.mode == "RGBA"
    clear, solid = thumb.getpixel((200, 100)), thumb.getpixel((20, 100))
    assert isinstance(clear, tuple) and isinstance(solid, tuple) and clear[3] == 0 and solid[3] == 255


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_the_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    """A camera's 400x200 picture (red left, blue right) stored sideways: the thumbnail stands upright."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(halves((400, 200), RED, BLUE), "JPEG", exif=exif.tobytes(), quality=95)
    for thumb in (made(tmp_path, data, "job_0.jpg"), rebuilt(tmp_path, data, "job_1.jpg")):
        if orientation == 3:  # turned half-way: blue on the left
            assert thumb.size == (256, 128)
            assert close_to(thumb.getpixel((20, 64)), BLUE) and close_to(thumb.getpixel((236, 64)), RED)
        else:  # 6 turns it clockwise (red on top), 8 counter-clockwise (red below)
            assert thumb.size == (128, 256)
            upper, lower = (RED, BLUE) if orientation == 6 else (BLUE, RED)
            assert close_to(thumb.getpixel((64, 20)), upper) and close_to(thumb.getpixel((64, 236)), lower)
        assert "exif" not in thumb.info  # turned once, not again by a viewer


def rebuilt(folder: Path, data: bytes, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Commit ``data`` as output ``name``, rebuild its thumbnail from the file, and open it."""
    (folder / name).write_bytes(data)
    thumbnails = Thumbnails(folder / ".thumbs", limits)
    assert thumbnails.rebuild(name)
    thumbnails.close()
    image = Image.open(folder / ".thumbs" / thumbnail_name(name))
    image.load()
    return image


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animation_shows_its_first_frame(tmp_path: Path, fmt: str) -> None:
    frames = [Image.new("RGB", (300, 200), colour) for colour in (GREEN, RED, BLUE)]
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert validate_image(io.BytesIO(data)).frames == 3
    ext = {"GIF": "gif", "WEBP": "webp", "PNG": "png"}[fmt]
    for thumb in (made(tmp_path, data, f"job_0.{ext}"), rebuilt(tmp_path, data, f"job_1.{ext}")):
        assert getattr(thumb, "n_frames", 1) == 1 and thumb.size == (256, 171)
        assert close_to(thumb.getpixel((128, 85)), GREEN)


# -- within the limits ----------------------------------------------------------------------------------------


def test_a_huge_jpeg_is_rebuilt_from_a_reduced_decode_within_the_limits(tmp_path: Path) -> None:
    """8000x6000 (48 MP, under the 100 MP limit): decoded at 1/8 scale (1000x750), never in full."""
    data = encoded(halves((8000, 6000), RED, BLUE), "JPEG", quality=50)
    with open_first_frame(io.BytesIO(data), ImageLimits(), draft_edge=256) as image:
        assert image.size == (1000, 750)
    thumb = rebuilt(tmp_path, data, "job_0.jpg")
    assert thumb.size == (256, 192)
    assert close_to(thumb.getpixel((20, 96)), RED) and close_to(thumb.getpixel((236, 96)), BLUE)


def test_an_image_over_the_limits_gets_no_thumbnail_and_nothing_fails(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    limits = ImageLimits(max_pixels=1_000_000)
    (tmp_path / "job_0.png").write_bytes(encoded(Image.new("RGB", (2000, 1000), RED), "PNG"))
    with pytest.raises(ImageRejected, match="over the 1,000,000 limit"):
        open_first_frame(tmp_path / "job_0.png", limits)
    thumbnails = Thumbnails(tmp_path / ".thumbs", limits)
    with caplog.at_level(logging.WARNING, "materializer.thumbnails"):
        assert not thumbnails.rebuild("job_0.png")
    assert "no thumbnail for job_0.png" in caplog.text and "1,000,000" in caplog.text
    assert thumbnails.path_of("job_0.png") is None


def test_a_first_frame_over_the_memory_budget_is_not_decoded_for_a_thumbnail(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 10000x10000 PNG is within every image limit but its first frame is 400 MB: with a 256 MiB budget the
    rebuild refuses it (and reserves only the file), where a sequential JPEG of that size decodes at 1/8."""
    budget = 256 << 20
    (tmp_path / "job_0.png").write_bytes(blank_png(10_000, 10_000))
    thumbnails = Thumbnails(tmp_path / ".thumbs", DEFAULT_LIMITS, max_decode_bytes=budget)
    assert thumbnails.rebuild_memory("job_0.png") == (tmp_path / "job_0.png").stat().st_size
    with caplog.at_level(logging.WARNING, "materializer.thumbnails"):
        assert not thumbnails.rebuild("job_0.png")
    assert "its first frame needs 400,000,000 bytes decoded, more than the memory budget" in caplog.text
    jpeg = encoded(halves((8000, 6000), RED, BLUE), "JPEG", quality=50)
    (tmp_path / "job_1.jpg").write_bytes(jpeg)
    assert thumbnails.rebuild_memory("job_1.jpg") == len(jpeg) + 1000 * 750 * 4
    assert thumbnails.rebuild("job_1.jpg")
    thumbnails.close()


def test_a_jpeg_over_the_budget_gets_its_thumbnail_from_the_eighth_scale_decode(tmp_path: Path) -> None:
    data = encoded(halves((4096, 2048), RED, BLUE), "JPEG", quality=50)
    frame = FirstFrame()
    info = validate_image(io.BytesIO(data), DEFAULT_LIMITS, frame, full_decode_limit=1 << 20)
    assert (info.width, info.height) == (4096, 2048)
    assert frame.small is not None and frame.small.size == (256, 128)
    assert close_to(frame.small.getpixel((20, 64)), RED) and close_to(frame.small.getpixel((236, 64)), BLUE)


def test_a_hook_that_meets_something_odd_records_it_instead_of_raising() -> None:
    frame = FirstFrame()
    frame(Image.new("RGB", (0, 0)))  # nothing Pillow can reduce or encode
    assert frame.small is None and frame.error


# -- derived data: rebuilt, never fatal --------------------------------------------------------------------------


def image_file(name: str) -> OutputFile:
    return OutputFile(0, name, "image/png", 600, 300, 1, "0" * 64)


def test_missing_and_broken_thumbnails_are_rebuilt_and_sound_ones_are_left_alone(tmp_path: Path) -> None:
    names = ["a_0.png", "b_0.png", "c_0.png", "d_0.png", "e_0.png", "f_0.png"]
    for name in names:
        (tmp_path / name).write_bytes(encoded(halves((600, 300), RED, BLUE), "PNG"))
    thumbnails = Thumbnails(tmp_path / ".thumbs", ImageLimits())
    assert thumbnails.repair(image_file(name) for name in names) == 6
    folder = tmp_path / ".thumbs"
    sound = (folder / "a_0.webp").stat().st_ino
    (folder / "b_0.webp").unlink()                                       # missing
    whole = (folder / "c_0.webp").read_bytes()
    (folder / "c_0.webp").write_bytes(whole[: len(whole) // 2])         # cut off
    (folder / "d_0.webp").write_bytes(b"<html>not a picture</html>")    # something else
    # What a power loss can leave of a thumbnail committed without fsyncs (Thumbnails._commit):
    (folder / "e_0.webp").write_bytes(b"")                               # the rename without the data
    (folder / "f_0.webp").write_bytes(bytes(len(whole)))                 # the size without the data
    assert [thumbnails.is_sound(name) for name in names] == [True, False, False, False, False, False]
    assert thumbnails.repair([*(image_file(name) for name in names),
                              OutputFile(1, "e_1.mp4", "video/mp4", None, None, 9, "0" * 64)]) == 5
    assert all(thumbnails.is_sound(name) for name in names)
    assert (folder / "a_0.webp").stat().st_ino == sound
    for name in names:
        with Image.open(folder / thumbnail_name(name)) as thumb:
            thumb.load()
            assert thumb.size == (256, 128)
    assert sorted(p.name for p in folder.iterdir()) == [thumbnail_name(name) for name in names]


def test_a_symlink_planted_as_the_thumbnails_folder_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / ".thumbs").symlink_to(elsewhere)
    (outputs / "job_0.png").write_bytes(encoded(Image.new("RGB", (64, 64), RED), "PNG"))
    assert not Thumbnails(outputs / ".thumbs", ImageLimits()).rebuild("job_0.png")
    assert list(elsewhere.iterdir()) == []


async def test_a_thumbnail_that_cannot_be_made_holds_nothing_back(backend: DevBackend, tmp_path: Path) -> None:
    """``.thumbs`` is a file (the folder cannot exist): the job is materialized and announced all the same."""
    root = tmp_path / "root"
    outputs = default_layout(root).outputs
    outputs.mkdir(parents=True)
    (outputs / ".thumbs").write_bytes(b"in the way")
    [job_id] = backend.create_jobs(count=1, images=2)
    async with running_daemon(root, backend, **FAST) as daemon:
        await wait_materialized(daemon, [job_id])
        job = daemon.ledger.job(job_id)
    assert job is not None and (job.attempts, job.last_error) == (0, None)
    [event] = ledger_events(root, "media.materialized")
    assert event.payload["asset"]["thumbnailPaths"] == [None, None]
    [entry] = gallery(root)["jobs"]
    assert [f["thumbnail"] for f in entry["files"]] == [None, None]


async def test_the_daemon_rebuilds_thumbnails_that_went_missing_or_broke(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    jobs = backend.create_jobs(count=3)
    folder = default_layout(root).thumbnails
    async with running_daemon(root, backend, **FAST) as daemon:
        await wait_materialized(daemon, jobs)
    (folder / f"{jobs[0]}_0.webp").unlink()
    (folder / f"{jobs[1]}_0.webp").write_bytes(b"RIFF\x00\x00")
    async with running_daemon(root, backend, **FAST) as daemon:
        thumbnails = daemon.work.thumbnails
        assert thumbnails is not None

        def all_sound_and_listed() -> bool:
            listed = [f["thumbnail"] for entry in gallery(root)["jobs"] for f in entry["files"]]
            return all(thumbnails.is_sound(f"{job}_0.png") for job in jobs) and None not in listed

        await async_wait_until(all_sound_and_listed, what="the thumbnails rebuilt and listed")
    assert len(ledger_events(root, "media.materialized")) == 3  # nothing announced again


async def test_each_rebuild_waits_for_its_turn_so_a_backfill_yields_to_live_jobs(tmp_path: Path) -> None:
    """``before_each`` is awaited before every rebuild (the daemon's waits until no job is under way)."""
    root = tmp_path / "root"
    work = Workspace(DaemonOptions(root=root, convex_url="http://127.0.0.1:9"), owner="test")
    try:
        names = ["a_0.png", "b_0.png", "c_0.png"]
        for name in names:
            (work.store.path / name).write_bytes(encoded(halves((600, 300), RED, BLUE), "PNG"))
        folder = default_layout(root).thumbnails
        made_before_each_turn: list[int] = []
        turn = asyncio.Event()

        async def wait_for_turn() -> None:
            made_before_each_turn.append(len(list(folder.glob("*.webp"))) if folder.exists() else 0)
            await turn.wait()

        repairing = asyncio.create_task(work.repair_thumbnails([image_file(name) for name in names],
                                                               before_each=wait_for_turn))
        await async_wait_until(lambda: made_before_each_turn, what="the first turn asked for")
        assert not folder.exists() or not list(folder.glob("*.webp"))  # nothing made while the turn is withheld
        turn.set()
        assert await repairing == 3
        assert made_before_each_turn == [0, 1, 2]
    finally:
        await work.aclose()


async def test_without_thumbnails_the_setting_makes_none(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    [job_id] = backend.create_jobs(count=1)
    async with running_daemon(root, backend, thumbnails=False, **FAST) as daemon:
        await wait_materialized(daemon, [job_id])
    assert not default_layout(root).thumbnails.exists()
    [event] = ledger_events(root, "media.materialized")
    assert "thumbnailPaths" not in event.payload["asset"]
    assert [f["thumbnail"] for f in gallery(root)["jobs"][0]["files"]] == [None]


async def test_replay_makes_thumbnails_for_the_jobs_it_materializes_and_those_already_there(
    backend: DevBackend, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    jobs = backend.create_jobs(count=2, images=2)
    options = DaemonOptions(root=root, convex_url=backend.url, **FAST)
    code, summary = await replay(options, StaticTokenProvider(backend.token), since=0, until=None, job_ids=[],
                                 dry_run=False, out=io.StringIO())
    assert code == 0 and sorted(summary.materialized) == sorted(jobs)
    folder = default_layout(root).thumbnails
    expected = sorted(f"{job}_{index}.webp" for job in jobs for index in range(2))
    assert sorted(p.name for p in folder.iterdir()) == expected
    for name in expected[:3]:
        (folder / name).unlink()  # as after an upgrade from a version without thumbnails
    code, summary = await replay(options, StaticTokenProvider(backend.token), since=0, until=None, job_ids=[],
                                 dry_run=False, out=io.StringIO())
    assert code == 0 and sorted(summary.present) == sorted(jobs)
    assert sorted(p.name for p in folder.iterdir()) == expected
    assert sorted(f["thumbnail"] for entry in gallery(root)["jobs"] for f in entry["files"]) == [
        f".thumbs/{name}" for name in expected]
