"""The draw-a-digit page in Debian's headless Chromium, driven by Playwright: digits drawn as mouse and touch strokes,
small, large and off-centre, read back from the page; an empty canvas gets no guess; no request leaves 127.0.0.1.

The model is made here: one template per digit, the stroke digit below rendered with Pillow and prepared by
mnist-predict's code. A drawing is read right only if the page sends it and the server prepares it (crop, 20x20
box, centre of mass) into what the template was made from, whatever its size and place on the canvas.
"""

import shutil

import numpy as np
import pytest
from conftest import mnist_serve, write_linear_model
from PIL import Image, ImageDraw

from mnist_pipeline.predict import mnist_style

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
# No host name resolves (127.0.0.1 is an address): a page that needed another host would break, and every request
# is logged and checked as well.
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
CANVAS, PEN = 280, 18  # the page's canvas and pen, in canvas pixels

# Each digit as a person draws it: strokes of points in a unit box, traced after MNIST's handwritten shapes.
STROKES = {
    0: [[(0.5 + 0.3 * np.sin(a), 0.5 - 0.42 * np.cos(a)) for a in np.linspace(0, 2 * np.pi, 24)]],
    1: [[(0.58, 0.05), (0.42, 0.95)]],
    2: [[(0.2, 0.28), (0.35, 0.08), (0.62, 0.06), (0.78, 0.22), (0.7, 0.48), (0.2, 0.92), (0.85, 0.92)]],
    3: [[(0.2, 0.1), (0.7, 0.08), (0.78, 0.25), (0.45, 0.45), (0.8, 0.62), (0.72, 0.88), (0.2, 0.9)]],
    4: [[(0.55, 0.05), (0.15, 0.62), (0.85, 0.62)], [(0.65, 0.3), (0.62, 0.95)]],
    5: [[(0.8, 0.06), (0.3, 0.06), (0.25, 0.45), (0.65, 0.4), (0.8, 0.65), (0.62, 0.92), (0.2, 0.86)]],
    6: [[(0.7, 0.05), (0.35, 0.4), (0.25, 0.72), (0.42, 0.94), (0.7, 0.88), (0.74, 0.64), (0.5, 0.52), (0.28, 0.66)]],
    7: [[(0.15, 0.08), (0.85, 0.08), (0.4, 0.95)]],
    8: [
        [
            (0.7, 0.15),
            (0.5, 0.05),
            (0.3, 0.15),
            (0.35, 0.35),
            (0.65, 0.6),
            (0.7, 0.85),
            (0.5, 0.95),
            (0.3, 0.85),
            (0.35, 0.6),
            (0.65, 0.35),
            (0.7, 0.15),
        ]
    ],
    9: [[(0.75, 0.3), (0.55, 0.08), (0.3, 0.2), (0.35, 0.42), (0.7, 0.35), (0.75, 0.3), (0.7, 0.6), (0.6, 0.95)]],
}
# Where and how large a digit is drawn: (left, top, size) in canvas pixels.
PLACES = {"centred": (40, 40, 200), "small": (120, 110, 100), "large": (5, 5, 270), "off-centre": (150, 10, 120)}


def on_canvas(digit: int, place: str) -> list[list[tuple[float, float]]]:
    left, top, size = PLACES[place]
    return [[(left + x * size, top + y * size) for x, y in stroke] for stroke in STROKES[digit]]


def rendered(strokes) -> np.ndarray:
    image = Image.new("L", (CANVAS, CANVAS), 255)
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        draw.line(stroke, fill=0, width=PEN, joint="curve")
        for x, y in (stroke[0], stroke[-1]):  # round caps, as the page's pen
            draw.ellipse((x - PEN / 2, y - PEN / 2, x + PEN / 2, y + PEN / 2), fill=0)
    return np.asarray(image)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    templates = np.stack(
        [mnist_style(rendered(on_canvas(d, "centred")), (28, 28)).astype(np.float64).ravel() for d in STROKES]
    )
    templates -= templates.mean(1, keepdims=True)
    weights = 40 * templates.T / np.linalg.norm(templates, axis=1)  # a scaled correlation with each template
    model = write_linear_model(tmp_path_factory.mktemp("model") / "model.onnx", weights, [str(d) for d in STROKES])
    with mnist_serve("--model", str(model)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage", *OFFLINE]
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(has_touch=True, viewport={"width": 800, "height": 600})
    page = context.new_page()
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.goto(server)
    yield page
    assert page.requests and all(url.startswith(f"{server}/") for url in page.requests), page.requests
    context.close()


def settled(page) -> str:
    """The page's answer once its last request has returned."""
    page.wait_for_function("document.getElementById('canvas').dataset.pending === '0'")
    return page.inner_text("#status")


def draw_with_mouse(page, strokes) -> None:
    box = page.locator("#canvas").bounding_box()
    for stroke in strokes:
        page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=4)
        page.mouse.up()


def draw_with_touch(page, strokes) -> None:
    """Touch strokes through the DevTools protocol, as a finger on a touch screen sends them."""
    box = page.locator("#canvas").bounding_box()
    session = page.context.new_cdp_session(page)
    for stroke in strokes:
        points = [(box["x"] + x, box["y"] + y) for x, y in stroke]
        session.send(
            "Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": points[0][0], "y": points[0][1]}]}
        )
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            for t in np.linspace(0.25, 1, 4):
                point = {"x": x0 + (x1 - x0) * t, "y": y0 + (y1 - y0) * t}
                session.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
        session.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def test_an_empty_canvas_gets_no_guess_and_clear_empties_it(page):
    assert page.inner_text("#status") == "draw a digit" and page.locator("#top li").count() == 0
    draw_with_mouse(page, [[(140, 140), (141, 141)]])  # one dot of the pen: not a digit
    assert settled(page).startswith("draw a digit") and page.locator("#top li").count() == 0
    draw_with_mouse(page, on_canvas(7, "centred"))
    assert settled(page) == "7" and page.locator("#top li").count() == 3
    page.click("#clear")
    assert page.inner_text("#status") == "draw a digit" and page.locator("#top li").count() == 0


@pytest.mark.parametrize("place", list(PLACES))
def test_drawn_digits_are_read_wherever_and_however_large(page, place):
    shown = {}
    for digit in STROKES:
        draw_with_mouse(page, on_canvas(digit, place))
        shown[digit] = settled(page)
        top = page.locator("#top li .probability").all_inner_texts()
        assert len(top) == 3 and float(top[0]) >= float(top[1]) >= float(top[2])
        page.click("#clear")
    assert shown == {d: str(d) for d in STROKES}


def test_touch_strokes_draw_too(page):
    draw_with_touch(page, on_canvas(4, "off-centre"))
    assert settled(page) == "4"
