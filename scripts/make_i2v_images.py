"""Write the example first frames for image-to-video with the embedded model into assets/first-frames/ (or FOLDER).

    python scripts/make_i2v_images.py [FOLDER]

Each PNG is frame 0 of a procedural clip of the shipped model's training scene (`bwcache.tiny.data.EXAMPLE_IMAGES`),
named after the clip's prompt: `pipe("a red square moving right", image=Image.open("assets/first-frames/a-red-square-moving-right.png"))`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bwcache.tiny.data import write_example_images  # noqa: E402
from bwcache.tiny.pipeline import ASSETS_DIR, load_config  # noqa: E402


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "assets" / "first-frames"
    config = load_config(ASSETS_DIR)
    scene = config.get("data", {}).get("scene", "v1")
    d = config["defaults"]
    for path, prompt in write_example_images(folder, scene, d["height"], d["width"], d["num_frames"]):
        print(f"{path}  ({prompt})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
