// lorafleet playground, "Edit by example" tab: a before/after pair shows an edit, the server's
// LoRA of Change model (lorafleet serve --change DIR) applies it to another image.
// Loaded by playground.html after its own script: uses its $, headers, showError, errorText.
"use strict";
(() => {
  const FIGURES = [["before", "Before (A)"], ["after", "After (A′)"], ["image", "Image (B)"],
                   ["result", "Result (B′)"], ["truth", "True answer"]];
  const panel = document.createElement("main");
  panel.id = "edit";
  panel.setAttribute("aria-label", "Edit by example");
  panel.innerHTML = `
    <div class="edit-controls">
      <label>Example <select id="edit-example" data-testid="edit-example">
        <option value="">your own images</option></select></label>
      <label>Before (A) <input type="file" id="edit-before" accept="image/png"></label>
      <label>After (A′) <input type="file" id="edit-after" accept="image/png"></label>
      <label>Image to edit (B) <input type="file" id="edit-image" accept="image/png"></label>
      <label>Saved LoRA <select id="edit-lora" data-testid="edit-lora">
        <option value="">none: use the pair</option></select></label>
      <button type="button" id="edit-run" data-testid="edit-run" class="primary">Edit</button>
    </div>
    <p class="edit-note" id="edit-note"></p>
    <div class="edit-figures">${FIGURES.map(([k, t]) => `
      <figure id="edit-fig-${k}"${k === "truth" ? " hidden" : ""}>
        <img id="edit-${k === "result" ? "result" : "img-" + k}" alt="${t}">
        <figcaption>${t}</figcaption></figure>`).join("")}
    </div>
    <div class="stats" id="edit-stats" data-testid="edit-stats"></div>`;
  const style = document.createElement("style");
  style.textContent = `
    body[data-tab=edit] .chat-only { display: none !important; }
    body:not([data-tab=edit]) #edit { display: none; }
    .tabs { display: flex; gap: .3rem; align-self: center; }
    .tabs button[aria-selected=true] { border-color: var(--accent); color: var(--accent); }
    #edit { flex: 1; overflow-y: auto; padding: .8rem 1rem; }
    .edit-controls { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: end;
                     background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
                     padding: .6rem .8rem; }
    .edit-note { color: var(--muted); font-size: .85rem; margin: .5rem 0; }
    .edit-figures { display: flex; flex-wrap: wrap; gap: 1rem; }
    .edit-figures figure { margin: 0; background: var(--panel); border: 1px solid var(--line);
                           border-radius: 8px; padding: .5rem; text-align: center; }
    .edit-figures img { width: 192px; height: 192px; object-fit: contain; display: block;
                        image-rendering: pixelated; background: var(--bg); }
    .edit-figures img:not([src]) { visibility: hidden; }
    .edit-figures figcaption { font-size: .8rem; color: var(--muted); margin-top: .3rem; }
    #edit-fig-result { border-color: var(--accent); }
    #edit-result[data-state=busy] { opacity: .4; }`;
  document.head.append(style);
  $("chat").after(panel);

  const images = { before: null, after: null, image: null };  // Blobs sent to the server
  const urls = {};

  function show(key, blob) {
    const img = key === "result" ? $("edit-result") : $("edit-img-" + key);
    if (urls[key]) URL.revokeObjectURL(urls[key]);
    urls[key] = blob ? URL.createObjectURL(blob) : null;
    if (blob) img.src = urls[key]; else img.removeAttribute("src");
  }

  function pngBlob(b64) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type: "image/png" });
  }

  function resetResult() {
    show("result", null);
    $("edit-result").dataset.state = "idle";
    $("edit-stats").textContent = "";
  }

  function authOnly() {
    const h = headers();
    delete h["Content-Type"];  // the browser sets multipart/form-data with its boundary
    return h;
  }

  async function loadExample() {
    const id = $("edit-example").value;
    resetResult();
    $("edit-fig-truth").hidden = !id;
    panel.dataset.example = "";
    if (!id) return;
    const resp = await fetch(`/v1/images/examples/${encodeURIComponent(id)}`,
                             { headers: authOnly() });
    if (!resp.ok) { showError("Could not load the example — " + await errorText(resp)); return; }
    const body = await resp.json();
    for (const key of ["before", "after", "image"]) {
      images[key] = pngBlob(body.images[key]);
      show(key, images[key]);
      $("edit-" + key).value = "";
    }
    show("truth", pngBlob(body.images.truth));
    $("edit-note").textContent = `Example: ${body.label} (cut from held-out photos).`;
    panel.dataset.example = id;
    showError("");
  }

  function pick(key) {
    const file = $("edit-" + key).files[0] || null;
    images[key] = file;
    show(key, file);
    if ($("edit-example").value) {  // own images from now on
      $("edit-example").value = "";
      $("edit-fig-truth").hidden = true;
      panel.dataset.example = "";
      $("edit-note").textContent = "";
    }
    resetResult();
  }

  async function run() {
    const lora = $("edit-lora").value;
    const form = new FormData();
    if (!images.image) { showError("Choose an image to edit (B)."); return; }
    if (!lora && !(images.before && images.after)) {
      showError("Choose both images of the example pair (before and after), or a saved LoRA.");
      return;
    }
    form.append("image", images.image, "image.png");
    if (lora) form.append("lora", lora);
    else {
      form.append("before", images.before, "before.png");
      form.append("after", images.after, "after.png");
    }
    showError("");
    $("edit-run").disabled = true;
    $("edit-result").dataset.state = "busy";
    const t0 = performance.now();
    try {
      const resp = await fetch("/v1/images/edits", { method: "POST", headers: authOnly(),
                                                     body: form });
      if (!resp.ok) throw new Error(await errorText(resp));
      show("result", await resp.blob());
      await $("edit-result").decode();
      const img = $("edit-result"), seconds = (performance.now() - t0) / 1000;
      $("edit-stats").textContent =
        `${img.naturalWidth}×${img.naturalHeight} px · ${seconds.toFixed(2)} s`;
      img.dataset.state = "done";
    } catch (e) {
      $("edit-result").dataset.state = "error";
      show("result", null);
      showError("Edit failed — " + e.message);
    } finally {
      $("edit-run").disabled = false;
    }
  }

  function fill(select, values, keep) {
    for (const v of values) {
      const opt = document.createElement("option");
      opt.value = v;
      opt.textContent = v.replace(/^unseen:(.*)$/, "$1 (held out of training)");
      select.append(opt);
    }
    select.value = keep;
  }

  function setTab(tab) {
    document.body.dataset.tab = tab;
    $("tab-chat").setAttribute("aria-selected", String(tab === "chat"));
    $("tab-edit").setAttribute("aria-selected", String(tab === "edit"));
  }

  // The tab shows only when the server has an image editor (GET /v1/images/editor is 200).
  async function loadEditor() {
    let resp;
    try { resp = await fetch("/v1/images/editor", { headers: authOnly() }); } catch (e) { return; }
    $("tab-edit").hidden = !resp.ok;
    if (!resp.ok) { if (document.body.dataset.tab === "edit") setTab("chat"); return; }
    const info = await resp.json();
    for (const [id, values] of [["edit-example", info.examples], ["edit-lora", info.loras]]) {
      const select = $(id), keep = select.value;
      select.replaceChildren(select.options[0]);
      fill(select, values, values.includes(keep) ? keep : "");
    }
    $("edit-lora").closest("label").hidden = info.loras.length === 0;
    panel.dataset.model = info.model;
    $("edit-note").textContent ||= `LoC model ${info.model}: the pair is resized to ` +
      `${info.image_size} px; the image keeps its size (${info.min_side}–${info.max_side} px).`;
  }

  $("tab-chat").addEventListener("click", () => setTab("chat"));
  $("tab-edit").addEventListener("click", () => setTab("edit"));
  $("edit-example").addEventListener("change", loadExample);
  for (const key of ["before", "after", "image"]) {
    $("edit-" + key).addEventListener("change", () => pick(key));
  }
  $("edit-lora").addEventListener("change", resetResult);
  $("edit-run").addEventListener("click", run);
  $("api-key").addEventListener("change", loadEditor);
  setTab("chat");
  resetResult();
  loadEditor();
})();
