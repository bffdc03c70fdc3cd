"""EXIF orientation: our bounded reader (`app.images.decode_image`) against Pillow's public path
(`Image.open(fp, formats=["JPEG"])` + `ImageOps.exif_transpose`) on JPEGs whose EXIF block is corrupt
but whose pixels are intact, the kind of upload a server sees from odd cameras, editors and fuzzers.

Counted for each path: uploads refused (an exception: a 400 for a photo that decodes), uploads that
made Pillow emit a warning, distinct warning texts (each one is logged once and kept forever in the
warnings registry), and the orientation each path found. Then the time to decode a well-formed photo
with orientation 6 both ways.

    python -m benchmarks.exif [--uploads 5000] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import io
import struct
import warnings
from collections import Counter
from datetime import datetime, timezone
from functools import partial

from PIL import Image, ImageOps

from benchmarks import report


def _jpeg(size: tuple[int, int], app1: bytes | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, (0, 90, 0))
    image.paste((250, 250, 250), (0, 0, size[0] // 4, size[1] // 4))  # a corner marker: flips show
    image.save(buffer, "JPEG", quality=85)
    data = buffer.getvalue()
    if app1 is None:
        return data
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def _exif_block(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()  # starts with the APP1 "Exif\0\0" header


def pillow_path(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data), formats=["JPEG"]))


def distinct_tags(count: int) -> dict[str, float]:
    """Uploads whose one broken IFD entry has a different tag number each: under Python's default
    filter, how many warnings Pillow's path logs and keeps in the warnings registry."""
    from PIL import TiffImagePlugin

    from tests.badinputs import distinct_tag_jpegs

    registry = vars(TiffImagePlugin).setdefault("__warningregistry__", {})
    before = len(registry)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own default for UserWarning: once per text
        for data in distinct_tag_jpegs(count):
            pillow_path(data)
    return {"tag_uploads": count, "tag_warnings": len(caught), "tag_registry": len(registry) - before}


def compare(uploads: list[bytes]) -> dict[str, float]:
    import numpy as np

    from app.errors import ServiceError
    from app.images import decode_image

    counts: Counter[str] = Counter()
    texts: set[str] = set()
    for data in uploads:
        with warnings.catch_warnings():  # Pillow parses the EXIF block at open; not counted here
            warnings.simplefilter("ignore")
            stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # as stored, not oriented
        try:
            ours = np.asarray(decode_image(data, max_pixels=10**8).image)
        except ServiceError:
            ours = None
            counts["ours_refused"] += 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                pillows = np.asarray(pillow_path(data).convert("RGB"))
            except Exception:
                pillows = None
                counts["pillow_refused"] += 1
        counts["pillow_warned"] += bool(caught)
        texts.update(str(w.message) for w in caught)
        if ours is None or pillows is None:
            continue
        counts["both_decoded"] += 1
        if ours.shape == pillows.shape and np.array_equal(ours, pillows):
            counts["same_pixels"] += 1
        elif ours.shape == stored.shape and np.array_equal(ours, stored):
            counts["only_pillow_oriented"] += 1
        elif pillows.shape == stored.shape and np.array_equal(pillows, stored):
            counts["only_ours_oriented"] += 1
        else:
            counts["oriented_differently"] += 1
    counts["uploads"] = len(uploads)
    return {**counts, "pillow_warning_texts": len(texts)}



def timings(repeats: int) -> list[tuple[str, float, float]]:
    from app.images import decode_image

    rows = []
    for size in ((640, 480), (4000, 3000)):
        data = _jpeg(size, _exif_block(6))
        ours = report.median_ms(partial(decode_image, data, max_pixels=10**8), repeats)
        pillows = report.median_ms(partial(pillow_path, data), repeats)
        rows.append((f"{size[0]}x{size[1]}", ours, pillows))
    return rows


def render(result: dict[str, float], rows: list[tuple[str, float, float]], other_cores: float) -> str:
    import PIL

    n = result["uploads"]
    lines = [
        "## EXIF orientation: our reader vs `ImageOps.exif_transpose` (`python -m benchmarks.exif`)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, Pillow {PIL.__version__}: {n:.0f} JPEGs with a "
        "corrupt EXIF block and intact pixels (seeded). Pillow's path is "
        "`Image.open(fp, formats=[\"JPEG\"])` + `ImageOps.exif_transpose`.",
        "",
        "| | ours (`decode_image`) | Pillow's public path |",
        "|---|---|---|",
        f"| uploads refused (a 400 for a decodable photo) | {result.get('ours_refused', 0):.0f} | "
        f"{result.get('pillow_refused', 0):.0f} |",
        f"| uploads that emitted a warning | 0 | {result.get('pillow_warned', 0):.0f} |",
        f"| distinct warning texts (logged once each, kept in the warnings registry) | 0 | "
        f"{result['pillow_warning_texts']:.0f} |",
        "",
        f"The texts carry numbers from the file: {result['tag_uploads']:.0f} uploads whose one broken entry "
        f"has a different tag number each made Pillow's path log {result['tag_warnings']:.0f} warnings and "
        f"add {result['tag_registry']:.0f} entries to the warnings registry (Python's default filter; up to "
        "65,536 tag numbers).",
        "",
        f"Where both decoded ({result.get('both_decoded', 0):.0f}), the pixels were the same for "
        f"{result.get('same_pixels', 0):.0f}; ours alone applied an orientation for "
        f"{result.get('only_ours_oriented', 0):.0f} (it reads the Orientation entry when that lies inside "
        "the block; Pillow drops an IFD that runs past the end), Pillow alone for "
        f"{result.get('only_pillow_oriented', 0):.0f}, each a different one for "
        f"{result.get('oriented_differently', 0):.0f}. On damaged blocks no answer is the right one; on "
        "well-formed files both give the same pixels (`tests/unit/test_images.py`).",
        "",
        f"Median decode time of a well-formed photo, one thread (other processes took {other_cores:.2f} of "
        "the 2 cores meanwhile):",
        "",
        "| decode a well-formed JPEG with orientation 6 | ours ms | Pillow's path ms |",
        "|---|---|---|",
    ]
    lines += [f"| {size} | {ours:.2f} | {pillows:.2f} |" for size, ours, pillows in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=9)
    report.add_section_arguments(parser, "exif", quiet_wait_s=60.0)
    args = parser.parse_args()
    report.wait_if_asked(args)
    from benchmarks.procs import CpuMeter
    from tests.badinputs import corrupt_exif_jpegs

    result = {**compare(corrupt_exif_jpegs(args.uploads)), **distinct_tags(args.uploads)}
    meter = CpuMeter()
    rows = timings(args.repeats)
    report.publish(args, "exif", render(result, rows, meter.stop()["other_cores"]))


if __name__ == "__main__":
    main()
