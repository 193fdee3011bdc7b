"""Photo-like digits made from MNIST's test set, and the model's accuracy on each kind after mnist-predict's
preparation.

Each test digit is enlarged, printed as dark ink on paper at a random place, then photographed badly: under a
brightness gradient, with a shadow over a corner, blurred, noisy, or JPEG-compressed. The preparation must undo all
of it. Run after `make repro` (it reads data/prepared/ and models/model.onnx):

    .venv/bin/python tests/photo_digits.py [--images 1000] [--model models/model.onnx]

It prints the accuracy per kind beside the model's accuracy on the same digits as MNIST has them, and on MNIST's
own 28x28 images prepared again (the most a photo can hope for: the preparation is not quite MNIST's own).
"""

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

KINDS = ("paper", "gradient", "shadow", "blur", "noise", "jpeg")
PAGE = 160


def photo(digit: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One MNIST digit (28x28, light on black) as a grey photo (PAGE x PAGE) of dark ink on paper, of `kind`."""
    side = int(rng.integers(70, 121))
    ink = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    paper, dark = float(rng.uniform(200, 245)), float(rng.uniform(10, 70))
    page = np.full((PAGE, PAGE), paper, np.float32)
    top, left = (int(rng.integers(0, PAGE - side + 1)) for _ in range(2))
    page[top : top + side, left : left + side] = paper - ink * (paper - dark)
    ys, xs = np.indices(page.shape) / PAGE
    if kind == "gradient":  # light falling off across the page, in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * (xs - 0.5) + np.sin(angle) * (ys - 0.5)) + 0.5
        page *= 0.4 + 0.6 * np.clip(ramp, 0, 1)
    elif kind == "shadow":  # a soft-edged shadow over a random corner, up to half the page
        cx, cy = rng.choice([0.0, 1.0], size=2)
        distance = np.hypot(xs - cx, ys - cy)
        edge = rng.uniform(0.5, 0.8)
        page *= 1 - 0.55 * np.clip((edge - distance) / 0.08, 0, 1)
    elif kind == "blur":
        page = np.asarray(
            Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(rng.uniform(1.5, 2.5))
            )
        )
    elif kind == "noise":
        page = page + rng.normal(0, 12, page.shape)
    image = np.clip(np.round(page), 0, 255).astype(np.uint8)
    if kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(rng.integers(20, 41)))
        image = np.asarray(Image.open(buffer))
    return image


def write_examples(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The README's examples: MNIST test digits saved as a user might have them (the first of each class used)."""
    folder.mkdir(parents=True, exist_ok=True)
    first = {int(label): images[list(labels).index(label)] for label in (0, 1, 2, 4, 7, 9)}
    rng = np.random.default_rng(0)

    def enlarged(digit: np.ndarray, side: int) -> np.ndarray:
        return (
            np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        )

    page = np.full((300, 400), 245.0)  # a 7 in dark ink on a white page, off-centre
    page[150:270, 240:360] -= enlarged(first[7], 120) * 220
    Image.fromarray(page.astype(np.uint8)).save(folder / "seven.png")
    grey = 170 - enlarged(first[2], 96) * 120  # a 2 in dark grey on grey paper, as a JPEG
    Image.fromarray(grey.astype(np.uint8)).save(folder / "two.jpg", quality=75)
    blue = enlarged(first[1], 100)[..., None] * np.array([200, 160, 40])  # a 1 in blue ink on white, as a BMP
    Image.fromarray((255 - blue).astype(np.uint8), "RGB").save(folder / "one.bmp")
    rgba = np.zeros((112, 112, 4), np.uint8)  # a 0 in black on a transparent PNG
    rgba[..., 3] = (enlarged(first[0], 112) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "zero.png")
    Image.fromarray(photo(first[4], "gradient", rng)).save(folder / "four-gradient.png")  # light falling off
    Image.fromarray(photo(first[9], "shadow", rng)).save(folder / "nine-shadow.jpg", quality=85)  # a shadowed corner


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mnist_pipeline.predict import Classifier, NoDigit, mnist_style
    from mnist_pipeline.prepared import load_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="test digits per kind (default: 1000)")
    parser.add_argument("--model", default="models/model.onnx")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-examples", metavar="DIR", help="write the README's examples into DIR and stop")
    args = parser.parse_args()
    images, labels = load_split("test")
    if args.write_examples:
        return write_examples(Path(args.write_examples), images, labels)
    images, labels = images[: args.images], labels[: args.images]
    classifier = Classifier(args.model)
    mnist = (classifier.probabilities(images[:, None]).argmax(1) == labels).mean()
    restyled = np.stack([mnist_style(image, classifier.image_size) for image in images])
    ceiling = (classifier.probabilities(restyled[:, None]).argmax(1) == labels).mean()
    print(
        f"{len(images)} MNIST test digits per kind; as MNIST has them: accuracy {mnist:.4f}; "
        f"the same 28x28 images prepared again by mnist_style: {ceiling:.4f}"
    )
    for kind in KINDS:
        rng = np.random.default_rng(args.seed)
        prepared, blank = [], 0
        for digit in images:
            try:
                prepared.append(mnist_style(photo(digit, kind, rng), classifier.image_size))
            except NoDigit:
                blank += 1
                prepared.append(np.zeros(classifier.image_size, np.uint8))
        accuracy = (classifier.probabilities(np.stack(prepared)[:, None]).argmax(1) == labels).mean()
        print(f"{kind:9s} accuracy {accuracy:.4f}" + (f"  ({blank} found no digit)" if blank else ""))


if __name__ == "__main__":
    main()
