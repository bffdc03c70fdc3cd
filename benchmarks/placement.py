"""How long placing one decoded mask takes: Pillow's resize (what `app.masks.placement` runs) against the
numpy re-implementation of it that the server used before (`tests/unit/masks/resize_reference.py`).

A mask is placed per segmented object, in the prepare threads: resize the 64x64 map to the object's
pixel box, threshold, paste into an image-sized mask. The boxes here are the whole image (the worst
case) and a box of about 40 % of each side. RLE decoding (`decode_rle`, only used by clients and tests)
is timed beside `pycocotools.mask.decode` for the record.

    python -m benchmarks.placement [--repeats 15] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial

import numpy as np

from benchmarks import report

SIZES = ((200, 150), (1500, 1000), (4000, 3000))
BoxXYXY = tuple[float, float, float, float]
BOXES: dict[str, BoxXYXY] = {"whole image": (0.0, 0.0, 1.0, 1.0), "40 % box": (0.3, 0.3, 0.7, 0.7)}



@dataclass(frozen=True)
class Row:
    what: str
    size: tuple[int, int]
    old_ms: float
    new_ms: float
    same: bool


def run(repeats: int) -> tuple[list[Row], list[Row]]:
    """(place_mask rows: old numpy vs Pillow; RLE rows: decode_rle vs pycocotools.mask.decode)."""
    from pycocotools import mask as mask_utils

    from app.masks.placement import decode_rle, encode_rle, place_mask
    from tests.unit.masks import resize_reference

    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    m64 = (np.cos(5 * xx + 1) + np.sin(4 * yy) - 0.3).astype(np.float32)  # smooth, like a decoded mask
    placed: list[Row] = []
    decoded: list[Row] = []
    for width, height in SIZES:
        for name, box in BOXES.items():
            def old(box: BoxXYXY = box, width: int = width, height: int = height) -> np.ndarray:
                return resize_reference.place_mask(m64, box, width, height)

            def new(box: BoxXYXY = box, width: int = width, height: int = height) -> np.ndarray:
                return place_mask(m64, box, width, height)

            # Bit for bit when run in the installed Pillow's pass order.
            same = np.array_equal(new(), resize_reference.place_mask(m64, box, width, height,
                                                                     pillow13_order=True))
            old_ms, new_ms = report.median_ms(old, repeats), report.median_ms(new, repeats)
            placed.append(Row(name, (width, height), old_ms, new_ms, same))
        rle = encode_rle(place_mask(m64, BOXES["40 % box"], width, height))
        coco = {"size": rle["size"], "counts": rle["counts"].encode()}
        with warnings.catch_warnings():  # pycocotools warns on every decode under numpy 2
            warnings.simplefilter("ignore", DeprecationWarning)
            same = np.array_equal(mask_utils.decode(coco).astype(bool), decode_rle(rle))
            coco_ms = report.median_ms(partial(mask_utils.decode, coco), repeats)
        ours_ms = report.median_ms(partial(decode_rle, rle), repeats)
        decoded.append(Row("mask of the 40 % box", (width, height), ours_ms, coco_ms, same))
    return placed, decoded


def render(placed: list[Row], decoded: list[Row], other_cores: float, repeats: int) -> str:
    import PIL

    lines = [
        "## Mask placement: Pillow vs the numpy code it replaced (`python -m benchmarks.placement`)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, Pillow {PIL.__version__}, numpy {np.__version__}: "
        f"median of {repeats} runs, one thread (other processes took {other_cores:.2f} of the 2 cores "
        "meanwhile). `old`: `tests/unit/masks/resize_reference.py` (numpy, computes only the visible pixels);"
        " `new`: `app.masks.placement.place_mask` (Pillow). `same`: the two give the same mask.",
        "",
        "| place_mask | image | old ms | new ms | old / new | same |",
        "|---|---|---|---|---|---|",
    ]
    for row in placed:
        lines.append(f"| {row.what} | {row.size[0]}x{row.size[1]} | {row.old_ms:.2f} | {row.new_ms:.2f} | "
                     f"{row.old_ms / row.new_ms:.1f}x | {'yes' if row.same else 'NO'} |")
    lines += [
        "",
        "RLE decoding stays `decode_rle`: `pycocotools.mask.decode` is faster but returns uninitialised "
        "memory for counts that cover too few pixels and warns on every call under numpy 2; the server "
        "itself never decodes RLE (clients and tests do).",
        "",
        "| RLE decode | image | decode_rle ms | pycocotools ms | same |",
        "|---|---|---|---|---|",
    ]
    for row in decoded:
        lines.append(f"| {row.what} | {row.size[0]}x{row.size[1]} | {row.old_ms:.2f} | {row.new_ms:.2f} | "
                     f"{'yes' if row.same else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    report.add_section_arguments(parser, "placement", quiet_wait_s=60.0)
    args = parser.parse_args()
    report.wait_if_asked(args)
    from benchmarks.procs import CpuMeter

    meter = CpuMeter()
    placed, decoded = run(args.repeats)
    report.publish(args, "placement", render(placed, decoded, meter.stop()["other_cores"], args.repeats))


if __name__ == "__main__":
    main()
