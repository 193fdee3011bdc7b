// The draw-a-digit page: strokes on a canvas (mouse, pen or touch), sent as a PNG to /predict while you draw.
// The preparation (crop, 20x20 box, centre of mass) is the server's, the same code as mnist-predict's.
"use strict";
const canvas = document.getElementById("canvas");
const context = canvas.getContext("2d");
const status = document.getElementById("status");
const topList = document.getElementById("top");
let drawing = false, inked = false, inFlight = false, again = false, generation = 0;

function blank() {
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  inked = false;
  canvas.dataset.pending = "0";
  generation += 1; // an answer for an earlier drawing must not show
  show(null);
}

function show(result) {
  topList.replaceChildren();
  if (!result || result.class === null) {
    status.className = "status";
    status.textContent = "draw a digit"; // nothing drawn yet, or the server found no digit in it
    return;
  }
  status.className = "status guess";
  status.textContent = result.class;
  for (const entry of result.top) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "class";
    name.textContent = entry.class;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = (100 * entry.probability).toFixed(1) + "%";
    const value = document.createElement("span");
    value.className = "probability";
    value.textContent = entry.probability.toFixed(3);
    item.append(name, bar, value);
    topList.append(item);
  }
}

// One request at a time; strokes drawn meanwhile are sent once it returns, so the answer follows the pen.
async function ask() {
  if (!inked) return show(null);
  canvas.dataset.pending = "1"; // for tests and tools: "0" once the answer to the last stroke is shown
  if (inFlight) { again = true; return; }
  inFlight = true;
  const asked = generation;
  try {
    const png = await new Promise(resolve => canvas.toBlob(resolve, "image/png"));
    const form = new FormData();
    form.append("file", png, "canvas.png");
    const response = await fetch("/predict", { method: "POST", body: form });
    const result = await response.json();
    if (asked === generation) {
      if (response.ok) show(result);
      else { show(null); status.textContent = result.error || "the server could not answer"; }
    }
  } catch (error) {
    status.className = "status";
    status.textContent = "the server could not be reached";
  } finally {
    inFlight = false;
    if (again) { again = false; ask(); } else canvas.dataset.pending = "0";
  }
}

function point(event) {
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
}

canvas.addEventListener("pointerdown", event => {
  drawing = true;
  canvas.setPointerCapture(event.pointerId);
  const [x, y] = point(event);
  context.beginPath();
  context.moveTo(x, y);
  context.lineTo(x, y);
  context.stroke();
  inked = true;
  event.preventDefault();
});
canvas.addEventListener("pointermove", event => {
  if (!drawing) return;
  const [x, y] = point(event);
  context.lineTo(x, y);
  context.stroke();
  ask();
});
for (const type of ["pointerup", "pointercancel"]) {
  canvas.addEventListener(type, () => {
    if (!drawing) return;
    drawing = false;
    ask();
  });
}
document.getElementById("clear").addEventListener("click", blank);

context.lineWidth = 18;
context.lineCap = "round";
context.lineJoin = "round";
context.strokeStyle = "#000";
blank();
