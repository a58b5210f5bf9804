// The page of engine.serve: every string from the server or a file name goes in through
// textContent or a URL-encoded query parameter, never as markup.
"use strict";

const drop = document.getElementById("drop");
const fileInput = document.getElementById("file");
const kInput = document.getElementById("k");
const status = document.getElementById("status");
const results = document.getElementById("results");

function say(text, isError) {
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function figure(src, caption, extra) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = caption;
  fig.appendChild(img);
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.appendChild(cap);
  if (extra) fig.appendChild(extra);
  return fig;
}

function basename(key) {
  const parts = key.split(/[\\/]/);
  return parts[parts.length - 1] || key;
}

function show(answer, queryFigure) {
  results.replaceChildren();
  if (queryFigure) results.appendChild(queryFigure);
  for (const m of answer.matches) {
    const button = document.createElement("button");
    button.className = "similar";
    button.type = "button";
    button.textContent = "similar";
    button.addEventListener("click", () => similar(m.key));
    const fig = figure("/thumb?key=" + encodeURIComponent(m.key), "", button);
    fig.className = "match";
    fig.title = m.key;
    const cap = fig.querySelector("figcaption");
    cap.textContent = "#" + m.rank + " ";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = m.score.toFixed(4);
    cap.appendChild(score);
    cap.appendChild(document.createElement("br"));
    cap.appendChild(document.createTextNode(basename(m.key)));
    results.appendChild(fig);
  }
  say(answer.matches.length + " matches among " + answer.rows + " images", false);
}

async function answerOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    const reason = body && typeof body.error === "string" ? body.error : response.statusText;
    throw new Error(response.status + ": " + reason);
  }
  return body;
}

function k() {
  const v = parseInt(kInput.value, 10);
  return Number.isFinite(v) && v > 0 ? v : 12;
}

async function search(file) {
  if (!file) return;
  say("searching...", false);
  const form = new FormData();
  form.append("image", file);
  const queryFigure = figure(URL.createObjectURL(file), "query: " + file.name);
  queryFigure.className = "query";
  try {
    const response = await fetch("/search?k=" + k(), { method: "POST", body: form });
    show(await answerOf(response), queryFigure);
  } catch (e) {
    results.replaceChildren(queryFigure);
    say(String(e.message || e), true);
  }
}

async function similar(key) {
  say("searching...", false);
  const queryFigure = figure("/thumb?key=" + encodeURIComponent(key), "query: " + basename(key));
  queryFigure.className = "query";
  queryFigure.title = key;
  try {
    const response = await fetch("/similar?k=" + k() + "&key=" + encodeURIComponent(key));
    show(await answerOf(response), queryFigure);
  } catch (e) {
    say(String(e.message || e), true);
  }
}

async function info() {
  try {
    const s = await answerOf(await fetch("/stats"));
    document.getElementById("info").textContent =
      s.rows + " images indexed; model " + s.model + ", weights " + s.weights +
      ", descriptor " + s.descriptor;
    if (s.random_weights) {
      document.getElementById("note").textContent =
        "RANDOM weights (not ImageNet): scores show visual similarity of a random network";
    }
  } catch (e) {
    say(String(e.message || e), true);
  }
}

fileInput.addEventListener("change", () => search(fileInput.files[0]));
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (file) search(file);
});
info();
