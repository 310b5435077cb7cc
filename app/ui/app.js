// facegate web console: a small framework-free script over the JSON API of the same service.
// Everything shown comes from the API; user-given text (names) only ever goes into textContent, never into HTML.
"use strict";

const KEY_STORAGE = "facegate.apiKey"; // sessionStorage: the key lives as long as this browser tab
const PAGE_SIZE = 20;
const SVG_NS = "http://www.w3.org/2000/svg";

// ------------------------------------------------------------------------------------------------ helpers

function $(selector, root) {
  return (root || document).querySelector(selector);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  return node;
}

function fmt(x, digits) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits === undefined ? 3 : digits);
}

function pct(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "unknown";
  const p = x * 100;
  if (p === 0) return "0 %";
  if (p >= 10) return p.toFixed(1) + " %";
  if (p >= 1) return p.toFixed(2) + " %";
  if (p >= 0.001) return p.toFixed(3) + " %";
  return p.toPrecision(2) + " %";
}

// How many of some comparisons, for a sentence: "about 1 in 2,000 comparisons ..."; a share over 10 % as a percentage.
function howMany(x, comparisons) {
  if (!x) return "none of the measured " + comparisons;
  if (x > 0.1) return pct(x) + " of " + comparisons;
  return "about 1 in " + Math.round(1 / x).toLocaleString("en") + " " + comparisons;
}

function when(iso) {
  if (!iso) return "–";
  return String(iso).replace("T", " ").slice(0, 16);
}

function plural(n, one, many) {
  return n + " " + (n === 1 ? one : many);
}

function shortId(id) {
  return String(id).slice(0, 8);
}

const THRESHOLD_SOURCES = {
  request: "given with the request",
  deployment: "the stored deployment calibration",
  settings: "the FACEGATE_THRESHOLD setting",
};

const QUALITY_WORDS = {
  small_face: "face too small (inter-ocular distance, px)",
  blurry: "blurred (sharpness)",
  too_dark: "too dark (brightness)",
  too_bright: "too bright (brightness)",
  cut_off: "cut by the border (share of the box outside)",
  turned: "head turned (|yaw|)",
  tilted: "head tilted (|roll|, degrees)",
  low_score: "doubtful detection (detector score)",
  indistinct: "no identity in the face: a photo turned sideways? (distinctiveness)",
};

// ------------------------------------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, code, message, details, requestId) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {};
    this.requestId = requestId || null; // the answer's X-Request-ID: what an operator finds the request by in the log
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

// fetch + the service's error JSON ({"error": {"code", "message", "details"}}) turned into an ApiError.
async function api(path, options) {
  const opts = options || {};
  const headers = {};
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  let body = opts.form;
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.json);
  }
  let response;
  try {
    response = await fetch(path, { method: opts.method || "GET", headers: headers, body: body });
  } catch (error) {
    throw new ApiError(0, "network", "The service did not answer (" + error.message + ").");
  }
  if (response.status === 401 && key && apiKey() === key) {
    sessionStorage.removeItem(KEY_STORAGE); // refused (unknown or revoked): not kept, not sent again
    showKeyState();
  }
  let data = null;
  if ((response.headers.get("content-type") || "").includes("json")) {
    try {
      data = await response.json();
    } catch (error) {
      data = null;
    }
  }
  if (!response.ok && !(opts.allow || []).includes(response.status)) {
    const e = (data && data.error) || {};
    const code = e.code || "http_" + response.status;
    const message = e.message || response.statusText || "request failed";
    throw new ApiError(response.status, code, message, e.details, response.headers.get("X-Request-ID"));
  }
  return data;
}

// Every load of a page (a navigation, a search, another page of the gallery, a reload after a change) takes the next
// number; its answer, or refusal, is dropped (Stale, which guarded() ignores) if a newer load has begun meanwhile: a
// slow answer never replaces what the operator has asked for since.
class Stale extends Error {}
let loads = 0;

async function latest(request) {
  const ticket = ++loads;
  let data;
  try {
    data = await request();
  } catch (error) {
    if (ticket === loads) throw error;
  }
  if (ticket !== loads) throw new Stale("a newer load has begun");
  return data;
}

// ------------------------------------------------------------------------------------------------ messages

let keepMessage = false;

function say(kind, text) {
  const box = $("#message");
  box.replaceChildren();
  box.className = "message " + kind;
  box.setAttribute("role", kind === "error" ? "alert" : "status");
  if (Array.isArray(text)) box.append(...text);
  else box.textContent = text;
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" });
}

function clearMessage() {
  const box = $("#message");
  box.hidden = true;
  box.replaceChildren();
}

function describeError(error) {
  if (!(error instanceof ApiError)) return "Something went wrong in the page: " + error.message;
  if (error.status === 401) {
    return "Not authorised (401): " + sentence(error.message) + " Enter a valid API key at the top of the page.";
  }
  if (error.status === 403) {
    return "Forbidden (403): " + sentence(error.message) + " Use a key with a wider scope for this.";
  }
  if (error.status === 0) return error.message;
  const photo = PHOTO_FIELDS[error.details.field]; // which of two photos a verify's error is about
  // A server-side failure names the request, for the operator to find in the log: quote it when reporting it.
  const request = error.status >= 500 && error.requestId ? ", request " + error.requestId : "";
  return (photo ? photo + ": " : "") + error.message + " (" + error.code + ", HTTP " + error.status + request + ")";
}

const PHOTO_FIELDS = { image_a: "First photo", image_b: "Second photo" };

function sentence(text) {
  return /[.!?)]$/.test(text) ? text : text + ".";
}

function showError(error) {
  say("error", describeError(error));
  if (error instanceof ApiError && error.status === 401) $("#key-input").focus(); // where the fix is typed
}

// A button disabled while its work runs loses the keyboard focus (the browser moves it to the page's body): the
// returned function gives it back once the work is done, to the button or else to `fallback`, unless the user has
// moved the focus elsewhere meanwhile.
function keepFocus(button) {
  const had = document.activeElement === button;
  return (fallback) => {
    const lost = document.activeElement === null || document.activeElement === document.body;
    if (!had || !lost) return;
    for (const target of [button, fallback]) {
      if (target && target.isConnected && !target.disabled && target.offsetParent !== null) {
        target.focus();
        return;
      }
    }
  };
}

// Runs an action, shows any failure as a readable message, and disables the button while it runs.
async function guarded(button, action) {
  const refocus = button ? keepFocus(button) : null;
  if (button) button.disabled = true;
  try {
    return await action();
  } catch (error) {
    if (!(error instanceof Stale)) showError(error);
    return undefined;
  } finally {
    if (button) button.disabled = false;
    if (refocus) refocus();
  }
}

// ------------------------------------------------------------------------------------------------ photos

const objectUrls = new WeakMap();

// The photo with an SVG layer on top drawing each face's box (numbered) and its 5 landmarks, in photo pixels.
function showPhoto(figure, file, faces, caption) {
  figure.replaceChildren();
  figure.hidden = false;
  const old = objectUrls.get(figure);
  if (old) URL.revokeObjectURL(old);
  const url = URL.createObjectURL(file);
  objectUrls.set(figure, url);
  const frame = el("div", { className: "frame" });
  const img = el("img", { src: url, alt: caption || "The photo sent" });
  const layer = svg("svg", { class: "overlay", "aria-hidden": "true" });
  frame.append(img, layer);
  figure.append(frame);
  if (caption) figure.append(el("figcaption", { text: caption }));
  img.addEventListener("load", () => {
    const w = img.naturalWidth;
    const h = img.naturalHeight;
    layer.setAttribute("viewBox", "0 0 " + w + " " + h);
    const unit = Math.max(w, h) / 100;
    (faces || []).forEach((face, i) => {
      const b = face.box;
      const g = svg("g", { class: "face " + (face.kind || "") });
      g.append(svg("rect", { x: b.left, y: b.top, width: b.right - b.left + 1, height: b.bottom - b.top + 1, "vector-effect": "non-scaling-stroke" }));
      for (const [x, y] of face.landmarks || []) {
        g.append(svg("circle", { cx: x, cy: y, r: Math.max(unit * 0.6, 1.5) }));
      }
      if ((faces || []).length > 1 || face.label) {
        const size = Math.max(unit * 3.2, 10);
        g.append(svg("text", { x: b.left, y: Math.max(b.top - size * 0.3, size), "font-size": size, text: face.label || String(i + 1) }));
      }
      layer.append(g);
    });
  }, { once: true });
}

function qualityTable(quality) {
  if (!quality) return null;
  const rows = [
    ["Inter-ocular distance", fmt(quality.inter_ocular_px, 1) + " px"],
    ["Sharpness", fmt(quality.sharpness, 1)],
    ["Brightness", fmt(quality.brightness, 0)],
    ["Outside the photo", pct(quality.outside_fraction)],
    ["Yaw", fmt(quality.yaw, 2)],
    ["Roll", fmt(quality.roll_deg, 1) + "°"],
    ["Detector score", fmt(quality.score, 2)],
  ];
  if (quality.distinctiveness !== null && quality.distinctiveness !== undefined) {
    rows.push(["Distinctiveness", fmt(quality.distinctiveness, 3)]);
  }
  const dl = el("dl", { className: "facts small" });
  for (const [k, v] of rows) dl.append(el("dt", { text: k }), el("dd", { text: v }));
  return dl;
}

function issuesList(issues) {
  const ul = el("ul", { className: "issues" });
  for (const i of issues || []) {
    ul.append(el("li", { text: (QUALITY_WORDS[i.issue] || i.issue) + ": measured " + fmt(i.measured, 2) + ", limit " + fmt(i.limit, 2) }));
  }
  return ul;
}

// Drag-and-drop onto a .drop zone fills its file input (the input itself stays usable with the keyboard).
function wireDropZones() {
  for (const zone of document.querySelectorAll(".drop")) {
    const input = document.getElementById(zone.dataset.drop);
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      if (event.dataTransfer && event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        input.dispatchEvent(new Event("change", { bubbles: true }));
      }
    });
  }
}

// ------------------------------------------------------------------------------------------------ gallery

// The gallery is paged by the API's cursor: each page's `next` is sent back as `after` for the page following it, so
// people enrolled or deleted meanwhile (by anyone) make it neither skip nor repeat anyone, as an offset would. The
// page shown is `after` (null: the first page, asked with no cursor); `back` holds the cursors of the pages before
// it as they were reached (the last one the page just before), so Previous returns to exactly that page. Where the
// page stands ("21–40 of 45") is the API's `start`: the people before it now, whoever was deleted meanwhile.
const gallery = { name: "", after: null, back: [], next: null };

function galleryHere() {
  return { after: gallery.after, back: gallery.back };
}

// The page `at` (default: the one shown); the position moves only once its page has come, so a failed Next or
// Previous leaves it where it was and trying again asks for the same page.
async function loadGallery(at = galleryHere()) {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (at.after !== null) params.set("after", at.after);
  if (gallery.name) params.set("name", gallery.name);
  const tbody = $("#gallery-table tbody");
  let page;
  try {
    page = await latest(() => api("/identities?" + params.toString()));
  } catch (error) {
    if (!(error instanceof Stale)) {
      tbody.replaceChildren(); // refused (key): the names read before are not left shown
      $("#gallery-summary").textContent = ""; // nor a count of rows no longer there
    }
    throw error;
  }
  if (!page.items.length && at.back.length) {
    // Nobody left after the cursor (the page's people deleted, or all after it): the page before it instead.
    return loadGallery({ after: at.back[at.back.length - 1], back: at.back.slice(0, -1) });
  }
  gallery.after = at.after;
  gallery.back = at.back;
  gallery.next = page.next || null;
  tbody.replaceChildren();
  for (const item of page.items) {
    tbody.append(el("tr", {},
      el("td", {}, el("a", { href: "#identity/" + item.id, text: item.name })),
      el("td", { text: String(item.face_count) }),
      el("td", { text: when(item.created_at) })));
  }
  const empty = page.total === 0;
  $("#gallery-table").hidden = empty;
  $("#gallery-empty").hidden = !empty;
  $("#gallery-empty").textContent = gallery.name ? "Nobody's name contains “" + gallery.name + "”." : "The gallery is empty.";
  const first = page.items.length ? page.start + 1 : 0;
  $("#gallery-summary").textContent = empty ? "" :
    first + "–" + (page.start + page.items.length) + " of " + page.total + (page.total === 1 ? " person" : " people");
  showPager();
}

// Previous and Next as the page shown allows, each off while the page it asked for loads (a double click asks once).
const pagerBusy = new Set();

function showPager() {
  for (const button of [$("#gallery-prev"), $("#gallery-next")]) {
    const possible = button.id === "gallery-prev" ? gallery.back.length > 0 : gallery.next !== null;
    button.disabled = !possible || pagerBusy.has(button);
  }
}

async function turnPage(button, at) {
  const refocus = keepFocus(button);
  pagerBusy.add(button);
  showPager();
  try {
    await guarded(null, () => loadGallery(at));
  } finally {
    pagerBusy.delete(button); // loaded, failed or overtaken: the buttons follow the page shown
    showPager();
    // On the first or last page its own button stays off: the other one, so that paging on by keyboard goes on
    refocus(button.id === "gallery-prev" ? $("#gallery-next") : $("#gallery-prev"));
  }
}

function wireGallery() {
  $("#gallery-search").addEventListener("submit", (event) => {
    event.preventDefault();
    // Another list: its first page, with no way back into the one left (nor on from it, should the search fail).
    gallery.name = $("#gallery-name").value.trim();
    Object.assign(gallery, { after: null, back: [], next: null });
    showPager();
    clearMessage();
    guarded(event.submitter, loadGallery);
  });
  $("#gallery-prev").addEventListener("click", (event) => {
    if (!gallery.back.length) return; // the first page
    turnPage(event.currentTarget, { after: gallery.back[gallery.back.length - 1], back: gallery.back.slice(0, -1) });
  });
  $("#gallery-next").addEventListener("click", (event) => {
    if (gallery.next === null) return; // the last page
    turnPage(event.currentTarget, { after: gallery.next, back: gallery.back.concat([gallery.after]) });
  });
}

// ------------------------------------------------------------------------------------------------ one person

let current = null; // the identity shown on the identity page

function clearIdentity() {
  current = null;
  $("#identity-body").hidden = true; // no form to act on nobody
  $("#identity-title").textContent = "Person";
  $("#identity-facts").replaceChildren();
  $("#faces-table tbody").replaceChildren();
  $("#addface-result").hidden = true;
  $("#addface-form").reset(); // a photo chosen for someone else is not added to the next person shown
}

async function loadIdentity(id) {
  // Another person: show nothing of the previous one while this one loads.
  if (!current || current.id !== id) clearIdentity();
  let identity;
  try {
    // "." and ".." would be resolved away by the URL parser (asking /identities/ or /), and "" (#identity/) asks
    // /identities/, which redirects to the gallery's list (shown as a person with no name): no person has these ids.
    if (id === "" || id === "." || id === "..") throw new ApiError(404, "unknown_identity", "unknown identity '" + id + "'");
    identity = await latest(() => api("/identities/" + encodeURIComponent(id)));
  } catch (error) {
    if (!(error instanceof Stale)) clearIdentity(); // deleted, or the key refused: nothing of them stays shown
    throw error;
  }
  current = identity;
  $("#identity-body").hidden = false;
  $("#identity-title").textContent = identity.name;
  $("#rename-input").value = identity.name;
  const facts = $("#identity-facts");
  facts.replaceChildren();
  const rows = [
    ["Id", identity.id],
    ["Faces", String(identity.face_count)],
    ["Enrolled", when(identity.created_at)],
    ["Changed", when(identity.updated_at)],
    ["Metadata", JSON.stringify(identity.metadata)],
  ];
  for (const [k, v] of rows) facts.append(el("dt", { text: k }), el("dd", { text: v }));
  const tbody = $("#faces-table tbody");
  tbody.replaceChildren();
  for (const face of identity.faces || []) {
    const b = face.box;
    const button = el("button", { type: "button", className: "danger small", "aria-label": "Delete face " + shortId(face.id), text: "Delete face" });
    button.addEventListener("click", (event) => deleteFace(event, button, face.id));
    tbody.append(el("tr", {},
      el("td", {}, el("code", { text: shortId(face.id), title: face.id })),
      el("td", { text: when(face.created_at) }),
      el("td", { text: b ? b.left + "," + b.top + " – " + b.right + "," + b.bottom + " (" + (b.right - b.left + 1) + "×" + (b.bottom - b.top + 1) + " px)" : "–" }),
      el("td", { text: fmt(face.score, 2) }),
      el("td", { text: face.model_version + (face.stale ? " (stale: not searched)" : "") }),
      el("td", {}, button)));
  }
  if (!(identity.faces || []).length) {
    tbody.append(el("tr", {}, el("td", { colspan: "6", text: "No face left: add one, or delete the person." })));
  }
  $("#delete-confirm").hidden = true;
  $("#delete-person").hidden = false;
}

// Deleting a face asks once more on the same button (keyboard users keep their place). The second click of a double
// click (event.detail 2) is not an answer to the question it raised (a keyboard's click has detail 0).
async function deleteFace(event, button, faceId) {
  if (button.dataset.armed !== "yes") {
    button.dataset.armed = "yes";
    button.textContent = "Really delete?";
    return;
  }
  if (event.detail > 1) return;
  const person = current;
  await guarded(button, async () => {
    const report = await api("/identities/" + encodeURIComponent(person.id) + "/faces/" + encodeURIComponent(faceId), { method: "DELETE" });
    say("info", "Deleted face " + shortId(faceId) + " of " + person.name + ": " + report.deleted_face_ids.length + " embedding removed.");
    if (stillShown(person)) await loadIdentity(person.id);
  });
}

// Whether the person page still shows `person`: an answer that comes after the user went on to someone else (or
// elsewhere) must not change that page; its message, naming whom it concerns, is still shown.
function stillShown(person) {
  return current !== null && current.id === person.id && location.hash.replace(/^#/, "").startsWith("identity/");
}

function wireIdentity() {
  $("#rename-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const person = current;
    guarded(event.submitter, async () => {
      const name = $("#rename-input").value.trim();
      const updated = await api("/identities/" + encodeURIComponent(person.id), { method: "PATCH", json: { name: name } });
      say("info", "Renamed " + person.name + " to " + updated.name + ".");
      if (stillShown(person)) await loadIdentity(person.id);
    });
  });
  $("#addface-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const file = $("#addface-file").files[0];
    const person = current;
    const sent = new FormData(form);
    guarded(event.submitter, async () => {
      let result;
      try {
        result = await api("/identities/" + encodeURIComponent(person.id) + "/faces", { method: "POST", form: sent });
      } catch (error) {
        if (stillShown(person)) showFacesFound(error, $("#addface-result"), file, "Faces found");
        throw error; // and its message
      }
      const added = result.already_enrolled ? result.name + " already has this face: nothing was added" : "Face added to " + result.name;
      say("info", added + ".");
      if (!stillShown(person)) return;
      showPhoto($("#addface-result"), file, [{ box: result.face.box, landmarks: result.face.landmarks, kind: "accepted" }], added);
      form.reset();
      await loadIdentity(person.id);
    });
  });
  $("#delete-person").addEventListener("click", () => {
    $("#delete-question").textContent = "Delete " + current.name + " and " + current.face_count + (current.face_count === 1 ? " face?" : " faces?");
    $("#delete-confirm").hidden = false;
    $("#delete-person").hidden = true;
    $("#delete-no").focus();
  });
  $("#delete-no").addEventListener("click", () => {
    $("#delete-confirm").hidden = true;
    $("#delete-person").hidden = false;
    $("#delete-person").focus();
  });
  $("#delete-yes").addEventListener("click", (event) => {
    const person = current;
    guarded(event.currentTarget, async () => {
      const report = await api("/identities/" + encodeURIComponent(person.id), { method: "DELETE" });
      const ids = report.deleted_face_ids.map(shortId).join(", ");
      say("info", "Deleted " + person.name + (report.identity_deleted ? " (the person" : " (") + " and " + report.deleted_face_ids.length +
        (report.deleted_face_ids.length === 1 ? " face" : " faces") + (ids ? ": " + ids : "") + "). Nothing of them is kept.");
      if (!stillShown(person)) return; // the user has gone on: stay there
      clearIdentity();
      keepMessage = true;
      location.hash = "#gallery";
    });
  });
}

// ------------------------------------------------------------------------------------------------ enrol

function wireEnrol() {
  const input = $("#enrol-file");
  input.addEventListener("change", () => {
    $("#enrol-result").replaceChildren();
    if (input.files[0]) showPhoto($("#enrol-photo"), input.files[0], [], "The photo to enrol");
  });
  $("#enrol-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const file = input.files[0];
    const result = $("#enrol-result");
    result.replaceChildren();
    clearMessage();
    guarded(event.submitter, async () => {
      try {
        const r = await api("/enroll", { method: "POST", form: new FormData(form) });
        showPhoto($("#enrol-photo"), file, [{ box: r.face.box, landmarks: r.face.landmarks, kind: "accepted" }], "Detected face and its 5 landmarks");
        result.append(el("p", { className: "ok", id: "enrol-ok" },
          (r.created ? "Enrolled " + r.name : r.already_enrolled ? r.name + " already has this face: nothing was added" : "Added a face to " + r.name) + ". ",
          el("a", { href: "#identity/" + r.identity_id, text: "Open " + r.name })));
        if (r.possible_duplicate) {
          const d = r.possible_duplicate;
          result.append(el("p", { className: "warn" }, "Warning: this face also matches ",
            el("a", { href: "#identity/" + d.identity_id, text: d.name }), " (distance " + fmt(d.distance) + ")."));
        }
        result.append(el("h3", { text: "Face quality" }), qualityTable(r.face.quality));
        $("#enrol-name").value = "";
        input.value = "";
      } catch (error) {
        if (!(error instanceof ApiError)) throw error;
        enrolRefused(error, file, result);
      }
    });
  });
}

function enrolRefused(error, file, result) {
  const d = error.details || {};
  if (error.code === "low_quality") {
    if (d.box) showPhoto($("#enrol-photo"), file, [{ box: d.box, landmarks: d.landmarks, kind: "refused" }], "The face judged");
    result.append(el("p", { className: "bad", id: "enrol-refused", text: "Refused: the face is not good enough to enrol." }), issuesList(d.reasons),
      el("p", { className: "muted", text: "Send a better photo, or tick “Enrol even if the quality is low”." }));
  } else if (error.code === "possible_duplicate") {
    result.append(el("p", { className: "warn", id: "enrol-duplicate" },
      "Possible duplicate: this face already matches ", el("a", { href: "#identity/" + d.identity_id, text: d.name }),
      " (distance " + fmt(d.distance) + ", threshold " + fmt(d.threshold, 2) + "). Add the photo to that person from their page, or tick “Enrol even if the face resembles someone” to create a new person."));
  } else if (error.code === "multiple_faces" && d.boxes) {
    showPhoto($("#enrol-photo"), file, d.boxes.map((box) => ({ box: box, kind: "refused" })), "Faces found");
    result.append(el("p", { className: "bad", id: "enrol-refused", text: "Refused: " + d.boxes.length + " faces in the photo. Tick “Several faces: take the largest” or send a photo of one person." }));
  } else {
    showError(error);
    return;
  }
}

// A `multiple_faces` refusal drawn on the photo sent: every face found, boxed as refused. True if it was one.
function showFacesFound(error, figure, file, caption) {
  if (!(error instanceof ApiError) || error.code !== "multiple_faces" || !Array.isArray(error.details.boxes)) return false;
  showPhoto(figure, file, error.details.boxes.map((box) => ({ box: box, kind: "refused" })), caption);
  return true;
}

// ------------------------------------------------------------------------------------------------ test

function testMode() {
  return $("#test-form").elements.mode.value;
}

function wireTest() {
  const form = $("#test-form");
  const onMode = () => {
    const verify = testMode() === "verify";
    $("#test-b").hidden = !verify;
    $("#test-file-b").required = verify;
    $("#test-topk").disabled = verify;
    $("#test-largest-label").hidden = !verify;
    $("#test-file-a-label").textContent = verify ? "First photo: choose a file or drop it here" : "Photo: choose a file or drop it here";
    $("#test-result").replaceChildren();
  };
  for (const radio of form.elements.mode) radio.addEventListener("change", onMode);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    clearMessage();
    $("#test-result").replaceChildren();
    guarded(event.submitter, testMode() === "verify" ? runVerify : runIdentify);
  });
}

function thresholdLine(r) {
  return "Threshold " + fmt(r.threshold, 2) + " (" + (THRESHOLD_SOURCES[r.threshold_source] || r.threshold_source) + "); " +
    "false-accept rate (1:1) at this threshold: " + pct(r.far_estimate) +
    (r.far_estimate && r.far_estimate <= 0.1 ? ", " + howMany(r.far_estimate, "impostor comparisons") + "." : ".");
}

async function runIdentify() {
  const form = new FormData();
  const file = $("#test-file-a").files[0];
  form.append("image", file);
  form.append("top_k", $("#test-topk").value || "5");
  if ($("#test-threshold").value) form.append("threshold", $("#test-threshold").value);
  const r = await api("/identify", { method: "POST", form: form });
  const out = $("#test-result");
  const figure = el("figure", { className: "photo" });
  out.append(figure);
  showPhoto(figure, file, r.faces.map((f, i) => ({
    box: f.face.box, landmarks: f.face.landmarks, kind: f.reason,
    label: (i + 1) + (f.match ? " " + f.match.name : ""),
  })), r.faces_detected > r.faces.length
    ? r.faces.length + " of " + r.faces_detected + " faces found: the most confident (FACEGATE_DETECTOR__MAX_FACES)"
    : r.faces.length + (r.faces.length === 1 ? " face" : " faces") + " found");
  out.append(el("p", { className: "muted", id: "test-threshold-used", text: thresholdLine(r) }),
    el("p", { className: "muted", text: "Searched " + plural(r.gallery_size, "face", "faces") + " of " + plural(r.identities, "person", "people") + "; target share of strangers named (FPIR): " + pct(r.target_fpir) + "." }));
  if (!r.faces.length) out.append(el("p", { className: "bad", text: "No face was found in the photo." }));
  r.faces.forEach((f, i) => out.append(identifiedFace(f, i, r.threshold)));
}

// Why nobody was named: the nearest is beyond the threshold, or within it but not standing out from the gallery
// (the open-set score fails for a gallery of this size), which the candidates table below shows as "within: yes".
function unknownWhy(f, threshold) {
  if (!f.candidates.length) return "Unknown: nobody enrolled is close enough (the gallery is empty).";
  const nearest = f.candidates[0];
  const at = nearest.name + " at distance " + fmt(nearest.distance);
  if (nearest.distance > threshold) return "Unknown: nobody enrolled is close enough (nearest " + at + ").";
  const scored = f.score !== null && f.score !== undefined && f.score_threshold !== null && f.score_threshold !== undefined;
  return "Unknown: the nearest, " + at + ", is within the threshold but does not stand out enough for a gallery " +
    "this size to be named" +
    (scored ? " (open-set score " + fmt(f.score, 3) + ", named at most " + fmt(f.score_threshold, 3) + ")." : ".");
}

function identifiedFace(f, i, threshold) {
  const n = i + 1;
  const card = el("article", { className: "face-card " + f.reason, id: "face-" + n, "aria-labelledby": "face-" + n + "-title" });
  const who = f.reason === "accepted" ? f.match.name : f.reason;
  card.append(el("h3", { id: "face-" + n + "-title", text: "Face " + n + ": " + who }));
  const why = {
    accepted: "Match: " + (f.match ? f.match.name : "") + " at distance " + (f.match ? fmt(f.match.distance) : "") + " (threshold " + fmt(threshold, 2) + ")" +
      (f.candidates.length > 1 ? ", clearly nearer than the runner-up." : "."),
    unknown: unknownWhy(f, threshold),
    ambiguous: "Ambiguous: the two nearest people are too close to tell apart, so nobody is named.",
  }[f.reason];
  card.append(el("p", { className: "decision " + f.reason, "data-reason": f.reason, text: why }));
  const extra = [];
  if (f.margin !== null && f.margin !== undefined) extra.push("margin to the runner-up " + fmt(f.margin));
  if (f.fpir_estimate !== null && f.fpir_estimate !== undefined) extra.push("share of strangers who would score this well: " + pct(f.fpir_estimate));
  if (f.face.quality && f.face.quality.issues.length) extra.push("quality: " + f.face.quality.issues.map((q) => q.issue).join(", "));
  if (extra.length) card.append(el("p", { className: "muted", text: extra.join("; ") + "." }));
  if (f.candidates.length) {
    const tbody = el("tbody");
    f.candidates.forEach((c, k) => tbody.append(el("tr", {},
      el("td", { text: String(k + 1) }),
      el("td", {}, el("a", { href: "#identity/" + c.identity_id, text: c.name })),
      el("td", { text: fmt(c.distance) }),
      el("td", { text: c.distance <= threshold ? "yes" : "no" }))));
    card.append(el("div", { className: "scroll" }, el("table", { className: "candidates" },
      el("caption", { text: "Nearest people" }),
      el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "#" }), el("th", { scope: "col", text: "Name" }),
        el("th", { scope: "col", text: "Distance" }), el("th", { scope: "col", text: "Within threshold" }))),
      tbody)));
  }
  return card;
}

async function runVerify() {
  const a = $("#test-file-a").files[0];
  const b = $("#test-file-b").files[0];
  const form = new FormData();
  form.append("image_a", a);
  form.append("image_b", b);
  if ($("#test-largest").checked) form.append("face", "largest");
  if ($("#test-threshold").value) form.append("threshold", $("#test-threshold").value);
  let r;
  try {
    r = await api("/verify", { method: "POST", form: form });
  } catch (error) {
    const second = error instanceof ApiError && error.details.field === "image_b";
    const figure = el("figure", { className: "photo" });
    if (showFacesFound(error, figure, second ? b : a, (second ? "Second" : "First") + " photo: faces found")) {
      $("#test-result").append(figure);
    }
    throw error;
  }
  const out = $("#test-result");
  const kind = r.match ? "accepted" : "unknown";
  out.append(el("p", { className: "decision " + kind, id: "verify-decision", "data-match": String(r.match),
    text: (r.match ? "Same person" : "Different people") + ": distance " + fmt(r.distance) + (r.match ? " ≤ " : " > ") + "threshold " + fmt(r.threshold, 2) + "." }));
  out.append(el("p", { className: "muted", text: thresholdLine(r) }));
  const pair = el("div", { className: "pair" });
  const fa = el("figure", { className: "photo" });
  const fb = el("figure", { className: "photo" });
  pair.append(fa, fb);
  out.append(pair);
  showPhoto(fa, a, [{ box: r.face_a.box, landmarks: r.face_a.landmarks, kind: kind }], "First photo");
  showPhoto(fb, b, [{ box: r.face_b.box, landmarks: r.face_b.landmarks, kind: kind }], "Second photo");
}

// ------------------------------------------------------------------------------------------------ threshold

let curve = null; // the loaded GET /calibration/curve answer

function interp(rows, t, field) {
  if (t <= rows[0].threshold) return rows[0][field];
  for (let i = 1; i < rows.length; i++) {
    if (t <= rows[i].threshold) {
      const a = rows[i - 1];
      const b = rows[i];
      const w = (t - a.threshold) / (b.threshold - a.threshold);
      return a[field] + w * (b[field] - a[field]);
    }
  }
  return rows[rows.length - 1][field];
}

async function loadCurve() {
  const source = $("#curve-source").value;
  curve = await latest(() => api("/calibration/curve?source=" + encodeURIComponent(source)));
  $("#curve-description").textContent = "Measured on " + curve.description + ": " + curve.n_same.toLocaleString("en") + " same-person and " +
    curve.n_different.toLocaleString("en") + " different-person pairs (model " + curve.model_version + ").";
  $("#threshold-active").textContent = "In use now: " + fmt(curve.threshold, 2) + ", from " + (THRESHOLD_SOURCES[curve.threshold_source] || curve.threshold_source) +
    " (FAR " + pct(interp(curve.rows, curve.threshold, "far")) + ", VAL " + pct(interp(curve.rows, curve.threshold, "val")) + " on this curve).";
  const slider = $("#threshold-slider");
  if (!slider.dataset.touched) slider.value = String(curve.threshold);
  updateSlider();
}

function updateSlider() {
  const t = Number($("#threshold-slider").value);
  $("#threshold-value").textContent = t.toFixed(2);
  if (!curve) return;
  const far = interp(curve.rows, t, "far");
  const upper = interp(curve.rows, t, "far_upper");
  const val = interp(curve.rows, t, "val");
  $("#threshold-readout").textContent = "At " + t.toFixed(2) + ": FAR " + pct(far) + " (upper bound " + pct(upper) + "): accepted for " +
    howMany(far, "comparisons of two different people") + ". VAL " + pct(val) + ": " + pct(1 - val) + " of comparisons of the same person are refused.";
  drawCurve(t);
}

function drawCurve(t) {
  const chart = $("#curve-chart");
  const title = $("#curve-chart-title");
  chart.replaceChildren(title);
  const X0 = 56, X1 = 584, Y0 = 262, Y1 = 16, TMAX = 1.2, FARMIN = 1e-5;
  const x = (v) => X0 + (v / TMAX) * (X1 - X0);
  const yVal = (v) => Y0 - v * (Y0 - Y1);
  const yFar = (v) => Y0 - ((Math.log10(Math.max(v, FARMIN)) - Math.log10(FARMIN)) / -Math.log10(FARMIN)) * (Y0 - Y1);
  chart.append(svg("rect", { x: X0, y: Y1, width: X1 - X0, height: Y0 - Y1, class: "plot" }));
  for (let v = 0; v <= TMAX + 1e-9; v += 0.2) {
    chart.append(svg("line", { x1: x(v), x2: x(v), y1: Y0, y2: Y0 + 5, class: "tick" }));
    chart.append(svg("text", { x: x(v), y: Y0 + 18, class: "label mid", text: v.toFixed(1) }));
  }
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    chart.append(svg("line", { x1: X0 - 5, x2: X0, y1: yVal(v), y2: yVal(v), class: "tick" }));
    chart.append(svg("text", { x: X0 - 8, y: yVal(v) + 4, class: "label end val", text: v * 100 + "%" }));
  }
  for (let e = -5; e <= 0; e++) {
    const v = Math.pow(10, e);
    chart.append(svg("line", { x1: X1, x2: X1 + 5, y1: yFar(v), y2: yFar(v), class: "tick" }));
    chart.append(svg("text", { x: X1 + 8, y: yFar(v) + 4, class: "label far", text: e === 0 ? "100%" : pct(v).replace(" ", "") }));
  }
  chart.append(svg("text", { x: (X0 + X1) / 2, y: Y0 + 34, class: "label mid", text: "threshold (squared L2 distance)" }));
  if (curve) {
    const rows = curve.rows.filter((r) => r.threshold <= TMAX);
    chart.append(svg("polyline", { class: "line val", points: rows.map((r) => x(r.threshold) + "," + yVal(r.val)).join(" ") }));
    chart.append(svg("polyline", { class: "line far", points: rows.map((r) => x(r.threshold) + "," + yFar(r.far)).join(" ") }));
    chart.append(svg("line", { x1: x(curve.threshold), x2: x(curve.threshold), y1: Y1, y2: Y0, class: "active" }));
  }
  chart.append(svg("line", { x1: x(t), x2: x(t), y1: Y1, y2: Y0, class: "cursor" }));
}

function wireThreshold() {
  $("#curve-form").addEventListener("submit", (event) => {
    event.preventDefault();
    clearMessage();
    guarded(event.submitter, loadCurve);
  });
  const slider = $("#threshold-slider");
  slider.addEventListener("input", () => {
    slider.dataset.touched = "yes";
    updateSlider();
  });
  $("#calibrate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    clearMessage();
    const form = event.currentTarget;
    guarded(event.submitter, async () => {
      const r = await api("/calibrate", { method: "POST", json: {
        source: "gallery", target_far: Number(form.elements.target_far.value), apply: form.elements.apply.checked } });
      $("#calibrate-result").textContent = "Threshold " + fmt(r.threshold) + " for a target FAR of " + pct(r.target_far) + ": measured FAR " + pct(r.far) +
        " (" + pct(r.far_interval[0]) + " – " + pct(r.far_interval[1]) + "), VAL " + pct(r.val) + " on " + r.n_pairs + " pairs of " + r.n_identities + " people. " +
        (r.applied ? "Stored as the deployment threshold." : "Not stored (tick the box to store it).");
      await loadCurve();
    });
  });
  $("#calibration-reset").addEventListener("click", (event) => {
    clearMessage();
    guarded(event.currentTarget, async () => {
      const r = await api("/calibration", { method: "DELETE" });
      $("#calibrate-result").textContent = (r.removed ? "Stored threshold removed" : "No threshold was stored") + ": requests now use " + fmt(r.threshold, 2) + ".";
      await loadCurve();
    });
  });
}

// ------------------------------------------------------------------------------------------------ health

function providerWords(providers) {
  return Object.entries(providers || {}).map(([net, p]) => {
    const short = !p ? "not loaded" : p.startsWith("CUDA") ? "CUDA (GPU)" : p.startsWith("CPU") ? "CPU" : p;
    return net + ": " + short;
  }).join(", ");
}

async function loadHealth() {
  const ready = await api("/readyz", { allow: [503] });
  const facts = $("#health-facts");
  facts.replaceChildren();
  const rows = [
    ["Status", ready.ready ? "ready" : "not ready: " + ready.problems.join(", ")],
    ["Provider", providerWords(ready.providers)],
    ["Model version", ready.model_version],
    ["Gallery", ready.gallery_size === null ? "unknown" : plural(ready.gallery_size, "face", "faces") + " of " + plural(ready.identities, "person", "people")],
    ["Stale faces", ready.stale_faces === null ? "unknown" : String(ready.stale_faces)],
    ["Database", ready.database ? "answering" : "unreachable"],
  ];
  for (const [k, v] of rows) facts.append(el("dt", { text: k }), el("dd", { text: v, "data-fact": k.toLowerCase().replace(" ", "-") }));
  const summary = await api("/metrics/summary");
  const source = summary.workers > 1 ? " to the " + summary.workers + " worker processes together" : "";
  $("#latency-summary").textContent = "The last " + summary.requests + " requests" + source + " (the server keeps " +
    summary.window + "), by API route; the console's own files are left out.";
  const tbody = $("#latency-table tbody");
  tbody.replaceChildren();
  for (const r of summary.routes.filter((r) => !r.route.startsWith("/ui"))) {
    tbody.append(el("tr", {}, el("td", { text: r.method + " " + r.route }), el("td", { text: String(r.count) }),
      el("td", { text: fmt(r.p50_ms, 1) + " ms" }), el("td", { text: fmt(r.p95_ms, 1) + " ms" }), el("td", { text: fmt(r.max_ms, 1) + " ms" })));
  }
}

// ------------------------------------------------------------------------------------------------ key

function showKeyState() {
  $("#key-state").textContent = apiKey() ? "key in use for this tab" : "no key";
  $("#key-input").placeholder = apiKey() ? "••••••••" : "not set";
}

function wireKey() {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("#key-input").value.trim();
    // A header carries only Latin-1, and a key only visible ASCII: anything else (a pasted zero-width space, a key
    // typed in another script) would make every request fail in the browser, blamed on the service.
    if (value && !/^[\x21-\x7e]+$/.test(value)) {
      say("error", "That is not an API key: a key is letters, digits and ASCII punctuation, without spaces or invisible characters. Nothing was saved.");
      $("#key-input").focus();
      return;
    }
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    $("#key-input").value = "";
    showKeyState();
    clearMessage();
    route();
  });
  $("#key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    // The page starts afresh: nothing read with the key (names, metadata, faces, photos tested) stays on screen.
    location.reload();
  });
}

// ------------------------------------------------------------------------------------------------ pages

const LOADERS = {
  gallery: loadGallery,
  enrol: async () => {},
  test: async () => {},
  threshold: loadCurve,
  health: loadHealth,
};

function route() {
  let hash = location.hash.replace(/^#/, "");
  try {
    hash = decodeURIComponent(hash);
  } catch (error) {
    // A malformed %-escape (a link edited by hand) is taken as it is: it names no page, nor anyone.
  }
  let page = hash || "gallery";
  let load;
  if (page.startsWith("identity/")) {
    const id = page.slice("identity/".length);
    page = "identity";
    load = () => loadIdentity(id);
  } else if (!(page in LOADERS)) {
    page = "gallery";
  }
  load = load || LOADERS[page];
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== "page-" + page;
  for (const link of document.querySelectorAll("nav a")) {
    const here = link.dataset.page === page || (page === "identity" && link.dataset.page === "gallery");
    if (here) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (keepMessage) keepMessage = false;
  else clearMessage();
  document.title = $("#page-" + page + " h2").textContent + " · facegate";
  loads++; // what an earlier page was still loading is no longer wanted
  guarded(null, load);
}

document.addEventListener("DOMContentLoaded", () => {
  wireKey();
  wireDropZones();
  wireGallery();
  wireIdentity();
  wireEnrol();
  wireTest();
  wireThreshold();
  $("#health-refresh").addEventListener("click", (event) => guarded(event.currentTarget, loadHealth));
  showKeyState();
  window.addEventListener("hashchange", route);
  route();
});
