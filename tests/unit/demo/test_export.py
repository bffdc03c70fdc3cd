"""The held-out dataset exporter: COCO detection json that pycocotools loads, masks that are the drawn
shapes, and the caption/VQA/OCR jsonl files that `paligemma eval` reads."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from app.demo import answers
from app.demo.export import CATEGORIES, EXPORT_STREAM, export
from app.demo.world import CANVAS, generate_scene, object_mask, scene_rng, tight_box

COUNT = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-dataset")
    export(seed=7, count=COUNT, out=out)
    return out


def test_coco_json_loads_in_pycocotools_with_one_category_per_colour_and_shape(dataset):
    coco = COCO(str(dataset / "coco.json"))
    names = [c["name"] for c in coco.loadCats(coco.getCatIds())]
    assert names == CATEGORIES and len(names) == 12 and "red circle" in names
    assert len(coco.getImgIds()) == COUNT
    for image in coco.loadImgs(coco.getImgIds()):
        path = dataset / image["file_name"]
        with Image.open(path) as written:
            assert written.size == (image["width"], image["height"])
            assert written.format == ("JPEG" if path.suffix == ".jpg" else "PNG")
    sizes = {(i["width"], i["height"]) for i in coco.loadImgs(coco.getImgIds())}
    assert (CANVAS, CANVAS) in sizes and len(sizes) > 1  # some at other sizes


def test_every_object_is_annotated_with_its_box_area_and_the_drawn_mask(dataset):
    coco = COCO(str(dataset / "coco.json"))
    for index, image in enumerate(coco.loadImgs(coco.getImgIds())):
        scene = generate_scene(scene_rng(EXPORT_STREAM, 7, index))
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert len(annotations) == len(scene.objects)
        width, height = image["width"], image["height"]
        for ann, obj in zip(annotations, scene.objects, strict=True):
            assert coco.loadCats(ann["category_id"])[0]["name"] == obj.name
            assert ann["iscrowd"] == 0
            drawn = object_mask(obj)
            if (width, height) != (CANVAS, CANVAS):
                drawn = np.asarray(Image.fromarray(drawn).resize((width, height), Image.Resampling.NEAREST))
            decoded = coco.annToMask(ann).astype(bool)
            assert decoded.shape == (height, width)
            assert (decoded == drawn).all()
            assert ann["area"] == int(drawn.sum())
            rle = {**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}
            assert ann["bbox"] == list(mask_utils.toBbox(rle))
            if (width, height) == (CANVAS, CANVAS):
                x0, y0, x1, y1 = tight_box(obj)
                assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_files_hold_the_answers_with_image_paths_relative_to_their_folder(dataset):
    captions, questions, ocr = (_lines(dataset / f"{n}.jsonl") for n in ("caption", "vqa", "ocr"))
    assert len(captions) == len(ocr) == COUNT and len(questions) >= 3 * COUNT
    for index, (caption, read) in enumerate(zip(captions, ocr, strict=True)):
        scene = generate_scene(scene_rng(EXPORT_STREAM, 7, index))
        assert (dataset / caption["image"]).is_file() and caption["image"] == read["image"]
        assert caption == {"image": caption["image"], "answers": [answers.caption(scene)]}
        assert read["answers"] == [scene.word.text if scene.word else ""]
    assert {q["question"] for q in questions} >= {"how many shapes are there?"}
    for q in questions:
        assert set(q) == {"image", "question", "answers"} and not q["question"].startswith("answer en")
        assert q["answers"][0] in {"1", "2", "3", "yes", "no", "red", "green", "blue", "yellow"}
    assert {"yes", "no"} <= {q["answers"][0] for q in questions}


def test_the_eval_commands_of_docs_demo_md_find_the_exported_files(dataset):
    """docs/demo.md's `paligemma eval` lines, run on an export written to `heldout/`, name files that exist:
    `--images` is the folder the COCO file's `file_name`s are relative to."""
    page = (Path(__file__).parents[3] / "docs" / "demo.md").read_text()
    commands = [line.split() for line in page.splitlines() if line.startswith("paligemma eval ")]
    assert {c[2] for c in commands} == {"detect", "segment", "caption", "vqa", "ocr"}
    coco = json.loads((dataset / "coco.json").read_text())
    for words in commands:
        options = dict(zip(words[3::2], words[4::2], strict=True))
        local = {name: dataset / Path(value).relative_to("heldout") for name, value in options.items()}
        if "--coco" in local:
            assert local["--coco"] == dataset / "coco.json"
            assert all((local["--images"] / image["file_name"]).is_file() for image in coco["images"])
        else:
            assert local["--jsonl"].is_file()
