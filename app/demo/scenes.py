"""The demo scenes shipped with the playground (and the README's example), drawn by the world generator
from fixed seeds: `python -m app.demo.scenes` writes them; a test checks the shipped files are exactly
what the generator draws.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from app.demo import answers
from app.demo.world import Scene, generate_scene, render, scene_rng

PLAYGROUND_STREAM = 4
STATIC_SCENES = Path(__file__).resolve().parents[1] / "static" / "playground" / "scenes"
MANIFEST = "scenes.json"


@dataclass(frozen=True)
class ShippedScene:
    seed: int
    task: str  # what the playground sets up when the scene is picked
    # Scenes picked by eye for variety: three shapes and a word, two of a shape, a lone one, ...
    name: str

    def scene(self) -> Scene:
        return generate_scene(scene_rng(PLAYGROUND_STREAM, self.seed, 0))

    @property
    def file_name(self) -> str:
        return f"{self.name}.png"


SHIPPED = (
    ShippedScene(0, "segment", "scene-1"),
    ShippedScene(9, "detect", "scene-2"),
    ShippedScene(13, "caption", "scene-3"),
    ShippedScene(12, "vqa", "scene-4"),
    ShippedScene(15, "ocr", "scene-5"),
)


def entry(shipped: ShippedScene) -> dict[str, str]:
    """What the playground needs to set the scene up: the file, the task, and its objects or question."""
    scene = shipped.scene()
    fields = {"file": shipped.file_name, "task": shipped.task, "caption": answers.caption(scene)}
    if shipped.task in ("detect", "segment"):
        fields["objects"] = " ; ".join(obj.name for obj in answers.left_to_right(scene.objects))
    if shipped.task == "vqa":
        fields["question"] = answers.HOW_MANY
    return fields


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for shipped in SHIPPED:
        path = directory / shipped.file_name
        render(shipped.scene()).save(path, format="PNG", optimize=True)
        written.append(path)
    (directory / MANIFEST).write_text(json.dumps([entry(s) for s in SHIPPED], indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.demo.scenes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=STATIC_SCENES)
    for path in write(parser.parse_args(argv).out):
        print(path)


if __name__ == "__main__":
    main()
