// The page of ptl serve (templates/classify.html), a file so the Content-Security-Policy allows no inline script.
(() => {
  // With JavaScript: previews at once, one request per photo, bars filled as answers arrive.
  // Without it, the form posts to this page and the server draws the same results.
  const app = document.getElementById("app"), form = document.getElementById("upload");
  const input = document.getElementById("file"), drop = document.getElementById("drop");
  const results = document.getElementById("results");
  const kind = app.dataset.kind, threshold = parseFloat(app.dataset.threshold), keep = parseFloat(app.dataset.keep);
  const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text; return e; };

  function widths(top) {  // probabilities as they are; decision scores scaled between the lowest and the best
    if (kind === "probability") return top.map(t => 100 * t.value);
    const values = top.map(t => t.value), lo = Math.min(...values), hi = Math.max(...values);
    return values.map(v => hi > lo ? 100 * (v - lo) / (hi - lo) : 100);
  }

  function render(card, answer) {
    const body = card.querySelector(".body");
    body.querySelector(".pending").remove();
    if (answer.error) { body.append(el("div", "error", "skipped: " + answer.error)); return; }
    const label = el("div", "label" + (answer.unknown ? " unknown" : ""), answer.label);
    label.dataset.label = answer.label;
    const list = el("ul", "bars"), top = answer.top.map(t => ({label: t.label, value: t[kind]}));
    widths(top).forEach((width, i) => {
      const li = el("li"), track = el("span", "track"), fill = el("span", "fill");
      track.setAttribute("role", "img");
      track.setAttribute("aria-label", `${top[i].label} ${top[i].value.toFixed(4)}`);
      fill.style.width = width.toFixed(1) + "%";
      track.append(fill);
      li.append(el("span", "", top[i].label), track, el("span", "value", top[i].value.toFixed(4)));
      list.append(li);
    });
    body.append(label, list);
    if (answer.unknown) body.append(el("p", "why", why(answer)));
  }

  function why(answer) {
    return `None of the classes fits: its ${app.dataset.scoreName} is ${answer.familiarity.toFixed(3)}, below ` +
      `${threshold.toFixed(3)}, the level ${Math.round(100 * keep)}% of the ${app.dataset.calibration} reach ` +
      `(closest class: ${answer.top[0].label}).`;
  }

  async function classify(files) {
    results.replaceChildren();
    await Promise.all(Array.from(files).map(async file => {
      const card = el("article", "result"), image = el("img"), body = el("div", "body");
      image.src = URL.createObjectURL(file);
      image.alt = file.name;
      body.append(el("div", "name", file.name), el("div", "pending", "classifying…"));
      card.append(image, body);
      results.append(card);
      const data = new FormData();
      data.append("file", file, file.name);
      try {
        const response = await fetch("api/predict", {method: "POST", body: data});
        // A file the server skips is one prediction with its error; a refused request is {error}, in JSON
        // unless waitress refused it before the application saw it.
        const json = (response.headers.get("Content-Type") || "").startsWith("application/json");
        const answer = json ? await response.json() : {error: (await response.text()).trim()};
        render(card, response.ok ? answer.predictions[0] : {error: answer.error});
      } catch (error) {
        render(card, {error: String(error)});
      }
    }));
  }

  form.addEventListener("submit", event => {
    if (!input.files.length) return;
    event.preventDefault();
    classify(input.files);
  });
  input.addEventListener("change", () => { if (input.files.length) classify(input.files); });
  ["dragenter", "dragover"].forEach(name => drop.addEventListener(name, event => {
    event.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach(name => drop.addEventListener(name, () => drop.classList.remove("over")));
  drop.addEventListener("drop", event => {
    event.preventDefault();
    const files = Array.from(event.dataTransfer.files).filter(f => f.type.startsWith("image/") || !f.type);
    if (files.length) classify(files);
  });
})();
