"""Write a held-out dataset of demo scenes: `python -m app.demo.export --seed S --count N --out DIR`.

    DIR/images/NNNNN.png|.jpg   the scenes: a quarter as drawn (224 px PNG), the rest at other sizes
                                (112 to 448 px a side) and/or as JPEG (quality 85 to 100), as clients send
    DIR/coco.json               COCO detection: one category per colour + shape ("red circle"), a box
                                [x, y, w, h] and a COCO RLE mask per object, in pixels of the written image
    DIR/caption.jsonl           {"image": "images/...", "answers": ["a red circle and a blue square"]}
    DIR/vqa.jsonl               {"image": ..., "question": "how many shapes are there?", "answers": ["2"]}
    DIR/ocr.jsonl               {"image": ..., "answers": ["TREE"]} ([""] when the scene has no word)
    DIR/scenes.jsonl            each scene's description (objects, word), for anyone who wants more

Image paths are relative to the folder of the file that names them. The scenes come from their own seeded
stream, never the one training draws from, so any seed is held out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from app.demo import answers
from app.demo.world import CANVAS, SHAPES, Scene, generate_scene, object_mask, render, scene_rng
from app.masks.placement import encode_rle, mask_area, mask_bbox

EXPORT_STREAM = 2
CATEGORIES = [f"{color} {shape}" for color in ("red", "green", "blue", "yellow") for shape in SHAPES]
_SIZES = (112, 448)


@dataclasses.dataclass(frozen=True)
class Written:
    file_name: str
    width: int
    height: int


def _variant(index: int, rng: np.random.Generator) -> tuple[tuple[int, int] | None, int | None]:
    """(size or None for 224 px, JPEG quality or None for PNG): each of the four kinds in turn."""
    resized, jpeg = index % 2 == 1, (index // 2) % 2 == 1
    size = None
    if resized:
        width = int(rng.integers(_SIZES[0], _SIZES[1] + 1))
        size = (width, width if rng.random() < 0.5 else int(rng.integers(_SIZES[0], _SIZES[1] + 1)))
    return size, int(rng.integers(85, 101)) if jpeg else None


def write_image(scene: Scene, index: int, rng: np.random.Generator, images: Path) -> Written:
    size, quality = _variant(index, rng)
    image = render(scene)
    if size is not None:
        image = image.resize(size, Image.Resampling.BICUBIC)
    name = f"{index:05d}.{'jpg' if quality else 'png'}"
    if quality:
        image.save(images / name, format="JPEG", quality=quality)
    else:
        image.save(images / name, format="PNG")
    return Written(f"images/{name}", image.width, image.height)


def coco_annotations(scene: Scene, written: Written, image_id: int, first_id: int) -> list[dict[str, object]]:
    """The objects of a scene in the written image's pixels: the drawn mask resized (nearest) to the image,
    and its tight box (on a 224 px image, exactly the object's tight box)."""
    out = []
    for offset, obj in enumerate(scene.objects):
        mask = object_mask(obj)
        if (written.width, written.height) != (CANVAS, CANVAS):
            mask = np.asarray(Image.fromarray(mask).resize((written.width, written.height),
                                                           Image.Resampling.NEAREST))
        rle = encode_rle(mask)
        x0, y0, x1, y1 = mask_bbox(rle) or (0.0, 0.0, 0.0, 0.0)
        out.append({
            "id": first_id + offset,
            "image_id": image_id,
            "category_id": CATEGORIES.index(obj.name) + 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": mask_area(rle),
            "iscrowd": 0,
            "segmentation": rle,
        })
    return out


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """How many; the colour of each shape there is one of; one present and one absent object."""
    asked = [(answers.HOW_MANY, answers.count_answer(scene))]
    for shape in SHAPES:
        color = answers.color_answer(scene, shape)
        if color is not None:
            asked.append((answers.color_question(shape), color))
    present = scene.objects[int(rng.integers(len(scene.objects)))]
    asked.append((answers.presence_question(present.color, present.shape), "yes"))
    absent = [kind for kind in CATEGORIES if kind not in {obj.name for obj in scene.objects}]
    color, shape = absent[int(rng.integers(len(absent)))].split()
    asked.append((answers.presence_question(color, shape), "no"))
    return asked


def export(seed: int, count: int, out: Path) -> dict[str, int]:
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    coco: dict[str, list[dict[str, object]]] = {
        "images": [], "annotations": [],
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                       for i, name in enumerate(CATEGORIES)],
    }
    lines: dict[str, list[str]] = {"caption": [], "vqa": [], "ocr": [], "scenes": []}
    for index in range(count):
        rng = scene_rng(EXPORT_STREAM, seed, index)
        scene = generate_scene(rng)
        written = write_image(scene, index, rng, images_dir)
        image_id = index + 1
        coco["images"].append({"id": image_id, "file_name": written.file_name, "width": written.width,
                               "height": written.height})
        coco["annotations"] += coco_annotations(scene, written, image_id, len(coco["annotations"]) + 1)
        lines["caption"].append(json.dumps({"image": written.file_name, "answers": [answers.caption(scene)]}))
        lines["vqa"] += [json.dumps({"image": written.file_name, "question": q, "answers": [a]})
                         for q, a in questions(scene, rng)]
        lines["ocr"].append(json.dumps({"image": written.file_name, "answers": [answers.ocr_answer(scene)]}))
        lines["scenes"].append(json.dumps({"image": written.file_name, **dataclasses.asdict(scene)}))
    (out / "coco.json").write_text(json.dumps(coco) + "\n")
    for name, rows in lines.items():
        (out / f"{name}.jsonl").write_text("".join(row + "\n" for row in rows))
    return {"images": count, "objects": len(coco["annotations"]), "questions": len(lines["vqa"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.demo.export", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True, help="the dataset's seed (any: all are held out)")
    parser.add_argument("--count", type=int, required=True, help="number of scenes")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    counts = export(args.seed, args.count, args.out)
    print(f"wrote {counts['images']} scenes ({counts['objects']} objects, {counts['questions']} questions) "
          f"to {args.out}")


if __name__ == "__main__":
    main()
