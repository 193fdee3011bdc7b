"""The draw-a-digit page with a real model: digits drawn as strokes in headless Chromium, read back from the page.

The stroke digits of tests/test_serve_page.py, in each of its places (centred, small, large, off-centre), each
drawn several times, slanted and jittered as a hand would; and MNIST test digits traced as strokes: each row of a
digit's ink painted with the pen, left to right, at a random size and place. Run after `make repro`:

    .venv/bin/python tests/drawn_digits.py [--model models/model.onnx] [--repeats 3] [--mnist 100]
        [--screenshot docs/serving.png]

It prints the accuracy on the page for each, and saves a screenshot of the page with a digit drawn.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import mnist_serve  # noqa: E402
from test_serve_page import CHROMIUM, OFFLINE, PLACES, STROKES, draw_with_mouse, on_canvas, settled  # noqa: E402


def as_drawn(strokes, rng: np.random.Generator):
    """Strokes slanted by up to 12 degrees about their centre and each point moved by up to 4 pixels."""
    points = np.concatenate([np.array(s) for s in strokes])
    centre = points.mean(0)
    angle = np.radians(rng.uniform(-12, 12))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return [
        [tuple(np.clip((np.array(p) - centre) @ rotation.T + centre + rng.uniform(-4, 4, 2), 2, 278)) for p in s]
        for s in strokes
    ]


def traced(digit: np.ndarray, rng: np.random.Generator) -> list[list[tuple[float, float]]]:
    """An MNIST digit (28x28) as pen strokes on the canvas: one stroke along each run of ink in each row, the
    digit 150 to 260 pixels tall at a random place."""
    scale = rng.uniform(150, 260) / 28
    left, top = (rng.uniform(2, 278 - 28 * scale) for _ in range(2))
    strokes = []
    for row in range(28):
        ink = np.concatenate([[False], digit[row] > 127, [False]])
        edges = np.flatnonzero(np.diff(ink.astype(int)))
        for start, end in zip(edges[::2], edges[1::2], strict=True):
            y = top + (row + 0.5) * scale
            strokes.append([(left + (start + 0.5) * scale, y), (left + (end - 0.5) * scale + 0.01, y)])
    return strokes


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/model.onnx")
    parser.add_argument("--repeats", type=int, default=3, help="drawings of each digit in each place (default: 3)")
    parser.add_argument("--mnist", type=int, default=100, help="MNIST test digits to trace (default: 100)")
    parser.add_argument("--screenshot", help="save a screenshot of the page here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with mnist_serve("--model", args.model) as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", *OFFLINE])
        page = browser.new_page(viewport={"width": 760, "height": 460})
        page.goto(url)
        right, total, wrong = 0, 0, []
        for place in PLACES:
            for digit in STROKES:
                for _ in range(args.repeats):
                    draw_with_mouse(page, as_drawn(on_canvas(digit, place), rng))
                    shown = settled(page)
                    total += 1
                    right += shown == str(digit)
                    if shown != str(digit):
                        wrong.append(f"{digit} {place} read as {shown}")
                    page.click("#clear")
        if total:
            print(
                f"{right}/{total} drawn digits read right ({right / total:.1%}); misread: {', '.join(wrong) or 'none'}"
            )
        if args.mnist:
            from mnist_pipeline.prepared import load_split

            images, labels = load_split("test")
            right, wrong = 0, []
            for index in range(args.mnist):
                draw_with_mouse(page, traced(images[index], rng))
                shown = settled(page)
                right += shown == str(labels[index])
                if shown != str(labels[index]):
                    wrong.append(f"test image {index} ({labels[index]}) read as {shown}")
                page.click("#clear")
            print(
                f"{right}/{args.mnist} MNIST test digits traced on the page read right ({right / args.mnist:.1%}); "
                f"misread: {', '.join(wrong) or 'none'}"
            )
        if args.screenshot:
            draw_with_mouse(page, as_drawn(on_canvas(2, "centred"), rng))
            settled(page)
            page.screenshot(path=args.screenshot)
        browser.close()


if __name__ == "__main__":
    main()
