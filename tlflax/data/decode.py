"""One image file -> uint8 RGB (S, S, 3): the single decode path of folders and `predict`.

Every readable image becomes RGB the same way (documented once, here):
- grayscale / bilevel / 16-bit: replicated to 3 channels; 16-bit values are scaled by 255/65535;
- CMYK, YCbCr, LAB, HSV: PIL's conversion to RGB;
- alpha (RGBA, LA, palette with transparency): composited on white, so transparent
  backgrounds look like the white product shots they usually are (dropping alpha would
  expose whatever colour the transparent pixels happen to hold, often black);
- EXIF orientation is applied before anything else;
- animated GIF / WebP: the first frame.
Then the short side is resized to S and the centre S x S is cut (one resample, bicubic,
antialiased). JPEGs are first DCT-downscaled by PIL's draft mode, but never below twice the
target size, so the final resample still sees enough pixels (as Image.thumbnail does).

Files that cannot be decoded raise `BadImageError` with a short `reason` code; the folder
source counts and lists them instead of stopping.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlflax.errors import UserError

DECODE_VERSION = 1  # bump when the pixels this module produces change (invalidates caches)
_EXIF_ORIENTATION = 0x0112
_DRAFT_GAP = 2.0  # draft never shrinks a JPEG below this multiple of the target size
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# Reason codes written in the manifest (the exception text goes along as `detail`).
REASONS = ("empty_file", "not_an_image", "too_large", "truncated", "corrupt", "unreadable")
# ... and "crashed_decoder" when the decoding process itself died on the file.


class BadImageError(UserError, ValueError):
    """A file that is not a decodable image; `reason` is one of REASONS."""

    def __init__(self, path, reason: str, detail: str):
        super().__init__(f"{path}: {reason}: {detail}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


@contextlib.contextmanager
def _own_pixel_limit():
    # PIL's global MAX_IMAGE_PIXELS would warn, or raise, before our own limit is checked;
    # switch it off while opening (this module checks `max_pixels` itself).
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_image(path, *, resize: int, max_pixels: int = Image.MAX_IMAGE_PIXELS) -> np.ndarray:
    """The file at `path` as uint8 (resize, resize, 3); BadImageError if it cannot be read.

    `max_pixels`: images with more pixels (width * height) are refused as `too_large`
    (decompression bombs); the trainer passes config.data.max_image_pixels.
    """
    if resize < 1:
        raise ValueError(f"load_image: resize must be >= 1, got {resize}")
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise BadImageError(path, "unreadable", str(e)) from e
    if size == 0:
        raise BadImageError(path, "empty_file", "0 bytes")
    return _open_and_decode(path, path=path, resize=resize, max_pixels=max_pixels)


def decode_bytes(data: bytes, *, name: str, resize: int, max_pixels: int) -> np.ndarray:
    """An encoded image held in memory (a stream record, a TFDS example) -> uint8
    (resize, resize, 3), decoded exactly as load_image decodes a file; `name` goes into
    the BadImageError."""
    if not data:
        raise BadImageError(name, "empty_file", "0 bytes")
    return _open_and_decode(io.BytesIO(data), path=name, resize=resize, max_pixels=max_pixels)


def _open_and_decode(source, *, path, resize: int, max_pixels: int) -> np.ndarray:
    with _own_pixel_limit():
        try:
            with Image.open(source) as img:
                return _decode_open_image(img, path=path, resize=resize, max_pixels=max_pixels)
        except BadImageError:
            raise
        except UnidentifiedImageError as e:
            raise BadImageError(path, "not_an_image", str(e)) from e
        except Exception as e:
            # Format plugins signal broken data with many types (OSError, SyntaxError,
            # struct.error from bad EXIF, ...): all of them make the file bad, not the run.
            reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
            raise BadImageError(path, reason, f"{type(e).__name__}: {e}") from e


def _decode_open_image(img: Image.Image, *, path, resize: int, max_pixels: int) -> np.ndarray:
    width, height = img.size
    if max_pixels and width * height > max_pixels:
        raise BadImageError(
            path,
            "too_large",
            f"{width}x{height} = {width * height} pixels > max_image_pixels={max_pixels}",
        )
    if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
        target = int(resize * _DRAFT_GAP)
        img.draft(img.mode, (target, target))  # both sides >= target after the DCT scaling
    img.load()
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
        img = ImageOps.exif_transpose(img)
    return resize_centre_crop(to_rgb(img), resize=resize)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, as the module docstring says."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img, dtype=np.float64)
        narrow = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(narrow, mode="L").convert("RGB")
    if img.mode == "F":
        narrow = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return Image.fromarray(narrow, mode="L").convert("RGB")
    return img.convert("RGB")


def resize_centre_crop(img: Image.Image, *, resize: int) -> np.ndarray:
    """Short side to `resize`, centre `resize` x `resize` crop, in one bicubic resample."""
    width, height = img.size
    side = min(width, height)
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    box = (left, top, left + side, top + side)  # the centre square, in source pixels
    if side == resize and width == height:
        out = img
    else:
        out = img.resize((resize, resize), Image.Resampling.BICUBIC, box=box)
    array = np.asarray(out, dtype=np.uint8)
    if array.shape != (resize, resize, 3):
        raise BadImageError("<in memory>", "corrupt", f"decoded to shape {array.shape}")
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------- many files

N_DECODED = 0  # files decoded by this process's decode_files (tests check cache reuse with it)
STREAM_RECORD = struct.Struct("<i")  # a stream record: the label (int32), then the JPEG bytes


def n_workers(requested: int) -> int:
    """config.data.workers -> a process count (0: every core this process may use)."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def _decode_chunk(paths, resize, max_pixels):
    """Worker: (images of the good files, [(position, reason, detail)] of the bad ones)."""
    images, bad = [], []
    for i, path in enumerate(paths):
        try:
            images.append(load_image(path, resize=resize, max_pixels=max_pixels))
        except BadImageError as e:
            images.append(None)
            bad.append((i, e.reason, e.detail))
    return images, bad


def encode_jpeg(image: np.ndarray, *, quality: int) -> bytes:
    """uint8 (S, S, 3) -> JPEG bytes, as a stream shard stores each image."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _encode_shard(paths, labels, resize, max_pixels, quality, out_path, skip=()):
    """Worker: decode `paths` (those at the positions in `skip` are not touched: they crashed
    a decoder) and write the good ones, re-encoded as JPEG at the stored size, as the records
    of one ArrayRecord file; (good flags, [(position, reason, detail)] of the bad ones)."""
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(str(out_path), "group_size:1,uncompressed")
    good, bad = [], []
    try:
        for i, (path, label) in enumerate(zip(paths, labels, strict=True)):
            if i in skip:
                good.append(False)
                bad.append((i, "crashed_decoder", "the decoding process died on this file"))
                continue
            try:
                image = load_image(path, resize=resize, max_pixels=max_pixels)
            except BadImageError as e:
                good.append(False)
                bad.append((i, e.reason, e.detail))
                continue
            writer.write(STREAM_RECORD.pack(int(label)) + encode_jpeg(image, quality=quality))
            good.append(True)
    finally:
        writer.close()
    return good, bad


_JOBS = {"decode": _decode_chunk, "shard": _encode_shard}


def decode_chunks(paths, *, resize: int, max_pixels: int, workers: int, chunk: int = 0, ahead=0):
    """(start, images, bad) per chunk of `paths`, in order, decoded over `workers` processes:
    images[i] is uint8 (S, S, 3) or None for a bad file, bad holds (position, reason, detail).
    ahead: chunks decoded ahead of the one awaited (0: all at once), which bounds the memory
    a consumer that writes chunks as they come (the mmap cache) needs."""
    global N_DECODED
    paths = [str(p) for p in paths]
    # Chunks: large enough to amortise the pipe, small enough that workers finish together.
    chunk = chunk or int(np.clip(len(paths) // (8 * n_workers(workers)), 1, 32))
    jobs = [
        (start, "decode", (paths[start : start + chunk], resize, max_pixels))
        for start in range(0, len(paths), chunk)
    ]
    for start, result in run_jobs(jobs, workers=workers, ahead=ahead):
        N_DECODED += len(result[0])
        yield start, *result


def decode_files(paths, *, resize: int, max_pixels: int, workers: int, chunk: int = 0):
    """Decode `paths` over `workers` processes: (uint8 (n_good, S, S, 3), good mask, bad list).

    The bad list holds dicts {'path', 'reason', 'detail'} in `paths` order. `workers=1`
    decodes in this process; `chunk`: files per job (0: chosen from the counts). The workers
    are fresh interpreters that import only this module (see _WorkerPool), not forks of a
    process that may run JAX's threads.
    """
    paths = [str(p) for p in paths]
    out = np.empty((len(paths), resize, resize, 3), np.uint8)
    good = np.zeros(len(paths), bool)
    bad = []
    chunks = decode_chunks(
        paths, resize=resize, max_pixels=max_pixels, workers=workers, chunk=chunk
    )
    for start, images, chunk_bad in chunks:
        for i, image in enumerate(images):
            if image is not None:
                out[start + i] = image
                good[start + i] = True
        bad.extend((start + i, reason, detail) for i, reason, detail in chunk_bad)
    bad = [{"path": paths[i], "reason": r, "detail": d} for i, r, d in sorted(bad)]
    return (out if good.all() else out[good]), good, bad


def run_jobs(jobs, *, workers: int, ahead: int = 0):
    """(key, result) of each (key, kind, args) job, in order: in this process (workers=1)
    or over a pool of fresh interpreters (see _WorkerPool)."""
    workers = min(n_workers(workers), max(1, len(jobs)))
    if workers == 1:
        for key, kind, args in jobs:
            yield key, _JOBS[kind](*args)
        return
    yield from _WorkerPool(workers).imap(jobs, ahead=ahead)


class _WorkerPool:
    """`n` Python processes running jobs (_JOBS) sent over pipes.

    Fresh interpreters (not multiprocessing's fork or spawn): forking a process that runs
    JAX's threads can deadlock, and spawn re-imports the caller's main script. A worker
    that dies on a file (a crash inside a decoder) is replaced; its job is retried one file
    at a time so only the culprit is marked bad ('crashed_decoder').
    """

    def __init__(self, n: int):
        self.n = n
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or "." for p in sys.path))
        self.stop = threading.Event()

    def _start(self):
        return subprocess.Popen(
            [sys.executable, "-c", "from tlflax.data import decode; decode._serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env,
        )

    def imap(self, jobs, *, ahead: int = 0):
        """(key, result) per job, in the jobs' order; at most `ahead` (0: all) jobs are
        handed out beyond the one awaited."""
        jobs = list(jobs)
        todo: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()
        threads = [
            threading.Thread(target=self._drive, args=(todo, done), daemon=True)
            for _ in range(min(self.n, len(jobs)))
        ]
        for thread in threads:
            thread.start()
        sent, held = 0, {}
        try:
            for i in range(len(jobs)):
                while sent < len(jobs) and (not ahead or sent <= i + ahead):
                    todo.put((sent, jobs[sent]))
                    sent += 1
                while i not in held:
                    item = done.get()
                    if isinstance(item, BaseException):
                        raise item
                    held[item[0]] = item[1]
                yield jobs[i][0], held.pop(i)
        finally:
            self.stop.set()
            for _ in threads:
                todo.put(None)
            for thread in threads:
                thread.join()

    def _drive(self, todo, done):
        worker = None
        try:
            while not self.stop.is_set():
                item = todo.get()
                if item is None:
                    return
                index, (_, kind, args) = item
                worker = worker or self._start()
                try:
                    pickle.dump((kind, args), worker.stdin)
                    worker.stdin.flush()
                    done.put((index, pickle.load(worker.stdout)))
                except (EOFError, OSError, pickle.UnpicklingError):
                    worker.kill()
                    worker.wait()
                    worker = None
                    done.put((index, _after_crash(kind, args)))
        except BaseException as e:  # surfaced in imap(), not lost in this thread
            done.put(e)
        finally:
            if worker is not None:
                worker.stdin.close()
                worker.wait()


def _after_crash(kind: str, args):
    """The result of a job whose worker died: each file is decoded alone in a fresh worker,
    and those that kill it too are marked 'crashed_decoder' (a shard is then written again
    without them)."""
    if kind == "shard":
        paths, _, resize, max_pixels, *_, skip = args
        if skip:  # it died again without the culprits: not a file's fault
            raise RuntimeError(f"a decode worker died twice writing {args[5]}")
    else:
        paths, resize, max_pixels = args
        if len(paths) == 1:
            return [None], [(0, "crashed_decoder", "the decoding process died on this file")]
    singles = [(i, "decode", ([p], resize, max_pixels)) for i, p in enumerate(paths)]
    alone = dict(_WorkerPool(1).imap(singles))
    if kind == "shard":
        crashed = {i for i, (_, bad) in alone.items() if bad and bad[0][1] == "crashed_decoder"}
        ((_, result),) = _WorkerPool(1).imap([(0, "shard", (*args[:6], crashed))])
        return result
    images = [alone[i][0][0] for i in range(len(paths))]
    bad = [(i, *alone[i][1][0][1:]) for i in range(len(paths)) if alone[i][1]]
    return images, bad


def _serve() -> None:
    """Worker loop: pickled (kind, args) in, _JOBS[kind](*args) out."""
    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the replies
    requests = sys.stdin.buffer
    while True:
        try:
            kind, args = pickle.load(requests)
        except EOFError:
            return
        pickle.dump(_JOBS[kind](*args), reply, protocol=5)
        reply.flush()
