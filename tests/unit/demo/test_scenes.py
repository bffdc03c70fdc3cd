"""The demo scenes shipped with the playground are exactly what the world generator draws."""

import json

import numpy as np
from PIL import Image

from app.demo import scenes
from app.demo.world import render


def test_shipped_scene_files_are_the_generators_output():
    manifest = json.loads((scenes.STATIC_SCENES / scenes.MANIFEST).read_text())
    assert manifest == [scenes.entry(s) for s in scenes.SHIPPED]
    for shipped in scenes.SHIPPED:
        with Image.open(scenes.STATIC_SCENES / shipped.file_name) as image:
            assert (np.asarray(image.convert("RGB")) == np.asarray(render(shipped.scene()))).all()
