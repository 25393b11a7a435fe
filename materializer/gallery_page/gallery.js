// The gallery page: a snapshot of the ledger, then live updates over server-sent events.
//
// Every string from the ledger (prompts, reasons, job ids, file names) is user or server text:
// it reaches the page only through textContent or a URL built with encodeURIComponent, never as
// markup. The page talks to its own origin only (relative URLs under the secret path).
"use strict";

(() => {
  const state = {
    seq: 0,
    jobs: new Map(),
    failed: new Map(),
    quarantined: new Map(),
    gaps: [],
    connection: null,
    daemon: { running: false, pid: null },
    stream: "connecting",
    source: null,
  };
  const $ = (id) => document.getElementById(id);
  const timeline = $("timeline");

  // -- building elements (text only) -------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  const fileUrl = (name) => "files/" + encodeURIComponent(name);
  const thumbUrl = (name) => "thumbs/" + encodeURIComponent(name);

  function when(ms, full) {
    const date = new Date(ms);
    if (!Number.isFinite(date.getTime())) return "unknown time";
    const thisYear = date.getFullYear() === new Date().getFullYear();
    return date.toLocaleString(undefined, full || !thisYear
      ? { dateStyle: "medium", timeStyle: "medium" }
      : { month: "short", day: "numeric", hour: "numeric", minute: "2-digit" });
  }

  function iso(ms) {
    const date = new Date(ms);
    return Number.isFinite(date.getTime()) ? date.toISOString() : null;
  }

  function bytes(count) {
    if (!Number.isFinite(count)) return "";
    if (count < 1024) return count + " B";
    if (count < 1024 * 1024) return Math.round(count / 1024) + " KB";
    return (count / 1024 / 1024).toFixed(1) + " MB";
  }

  const dims = (file) => (file.width && file.height ? file.width + "\u00d7" + file.height : "");
  const words = (text) => String(text || "").replace(/_/g, " ");

  function caption(...parts) {
    return parts.filter((part) => part).join(" \u00b7 ");
  }

  // -- job cards ---------------------------------------------------------------------------------

  function imageTile(job, file) {
    const img = el("img", {
      class: "thumb-img",
      src: file.thumbnail ? thumbUrl(file.thumbnail) : fileUrl(file.name),
      alt: job.prompt || "generated image",
      loading: "lazy",
      decoding: "async",
    });
    if (file.thumbnail) {
      // A thumbnail that went missing since the snapshot: show the file itself.
      img.addEventListener("error", () => img.setAttribute("src", fileUrl(file.name)), { once: true });
    }
    const button = el("button", {
      class: "thumb",
      type: "button",
      "aria-label": "Open image " + (file.index + 1) + " full size",
      dataset: { full: fileUrl(file.name), caption: caption(job.prompt, dims(file), bytes(file.bytes)) },
    }, img);
    button.addEventListener("click", () => openViewer(button));
    return el("figure", { class: "tile" }, button, el("figcaption", { text: caption(dims(file), bytes(file.bytes)) }));
  }

  function mediaTile(file, tag) {
    const media = el(tag, { controls: "", preload: "metadata", src: fileUrl(file.name) });
    return el("figure", { class: "tile " + tag }, media, el("figcaption", { text: caption(file.name, bytes(file.bytes)) }));
  }

  function textTile(file) {
    const pre = el("pre", { class: "text", text: "Loading\u2026" });
    fetch(fileUrl(file.name))
      .then((answer) => (answer.ok ? answer.text() : Promise.reject(new Error("HTTP " + answer.status))))
      .then((text) => { pre.textContent = text.length > 100000 ? text.slice(0, 100000) + "\u2026" : text; })
      .catch((error) => { pre.textContent = "Could not load " + file.name + ": " + error.message; });
    return el("figure", { class: "tile text" }, pre);
  }

  function downloadTile(file) {
    const ext = file.name.includes(".") ? file.name.split(".").pop().toUpperCase() + " " : "";
    const link = el("a", { class: "download", href: fileUrl(file.name), download: file.name, title: file.name,
      text: "Download " + ext + "file" });
    return el("p", { class: "tile download" }, link, " ", el("span", { class: "size", text: bytes(file.bytes) }));
  }

  function jobCard(job) {
    const images = job.files.filter((file) => file.mimeType.startsWith("image/"));
    const others = job.files.filter((file) => !file.mimeType.startsWith("image/"));
    const card = el("article", { class: "card job", dataset: { jobId: job.jobId } },
      el("header", {},
        el("h2", { class: "prompt", text: job.prompt || "(no prompt)" }),
        el("p", { class: "meta" },
          el("span", { class: "capability", text: words(job.capability) || "media" }),
          job.profile ? el("span", { class: "profile", text: job.profile }) : null,
          el("time", { datetime: iso(job.completedAt), title: when(job.completedAt, true), text: when(job.completedAt) }))),
      images.length ? el("div", { class: images.length > 1 ? "images group" : "images" },
        ...images.map((file) => imageTile(job, file))) : null,
      ...others.map((file) => {
        if (file.mimeType.startsWith("video/")) return mediaTile(file, "video");
        if (file.mimeType.startsWith("audio/")) return mediaTile(file, "audio");
        if (file.mimeType.startsWith("text/plain")) return textTile(file);
        return downloadTile(file);
      }));
    card.dataset.sort = String(job.completedAt);
    return card;
  }

  function failedCard(notice) {
    const card = el("article", { class: "card failed", role: "status", dataset: { failedId: notice.jobId } },
      el("h2", { class: "message", text: notice.message || "A job failed" }),
      el("p", { class: "meta" },
        el("span", { class: "capability", text: words(notice.capability) || "media" }),
        el("span", { text: notice.status === "unknown" ? "ended in an unknown state" : "failed" }),
        el("time", { datetime: iso(notice.notedAt), title: when(notice.notedAt, true), text: when(notice.notedAt) })),
      notice.detail ? el("p", { class: "detail", text: notice.detail }) : null);
    card.dataset.sort = String(notice.notedAt);
    return card;
  }

  function place(card, key) {
    const old = timeline.querySelector(key);
    if (old) old.remove();
    const sort = Number(card.dataset.sort);
    let before = null;
    for (const child of timeline.children) {
      if (Number(child.dataset.sort) < sort) { before = child; break; }
    }
    timeline.insertBefore(card, before);
  }

  function addJob(job, live) {
    state.jobs.set(job.jobId, job);
    state.quarantined.delete(job.jobId);
    const card = jobCard(job);
    if (live) card.classList.add("new");
    place(card, 'article.job[data-job-id="' + CSS.escape(job.jobId) + '"]');
  }

  function addFailed(notice, live) {
    state.failed.set(notice.jobId, notice);
    const card = failedCard(notice);
    if (live) card.classList.add("new");
    place(card, 'article.failed[data-failed-id="' + CSS.escape(notice.jobId) + '"]');
  }

  function summarize() {
    let images = 0;
    for (const job of state.jobs.values()) images += job.files.filter((f) => f.mimeType.startsWith("image/")).length;
    const jobs = state.jobs.size === 1 ? "1 job" : state.jobs.size + " jobs";
    const failed = state.failed.size ? ", " + state.failed.size + " failed" : "";
    $("summary").textContent = jobs + ", " + images + (images === 1 ? " image" : " images") + failed + ", newest first";
    $("empty").hidden = state.jobs.size + state.failed.size > 0;
  }

  // -- the banner: the daemon's state, and what may be missing --------------------------------------

  function renderBanner() {
    const banner = $("banner");
    const connection = state.connection || {};
    let kind, headline, detail = null, action = null;
    if (state.stream === "gone") {
      kind = "error";
      headline = "This gallery server is not answering any more. Run materializer gallery again and open the URL it prints.";
    } else if (!state.daemon.running) {
      kind = "stopped";
      headline = "The materializer is not running: this is what is on disk.";
    } else if (connection.state === "connected") {
      kind = "connected";
      headline = "Connected to Stella. New jobs appear here as they land.";
    } else if (connection.state === "auth_required") {
      kind = "auth_required";
      headline = "Sign-in needed.";
      action = connection.action || null;
      detail = connection.detail || null;
    } else if (connection.state === "token_needed") {
      kind = "token_needed";
      headline = "Waiting for a fresh token.";
      detail = connection.detail || null;
    } else if (connection.state === "disconnected") {
      kind = "disconnected";
      headline = "Disconnected from Stella; the materializer reconnects on its own.";
      detail = connection.detail || null;
    } else {
      kind = "connecting";
      headline = "The materializer is connecting to Stella.";
    }
    if (state.stream === "retrying" && kind !== "error") {
      detail = (detail ? detail + " " : "") + "(The page lost its connection to the gallery server and is retrying.)";
    }
    banner.className = "banner " + kind;
    banner.dataset.state = kind;
    banner.replaceChildren(...[
      el("p", { class: "headline", text: headline }),
      action ? el("p", { class: "action", text: action }) : null,
      detail ? el("p", { class: "detail", text: detail }) : null,
    ].filter((node) => node !== null));

    const notices = [];
    for (const gap of state.gaps) {
      notices.push(el("li", { class: "notice gap" },
        el("strong", { text: "Jobs may be missing. " }),
        "Jobs completed from " + when(gap.fromMs, true) + " until " + when(gap.untilMs, true) + " may be missing: at least "
          + gap.jobsAtLeast + " jobs completed since then and the backend lists only the newest of them"
          + (gap.reason ? " (" + gap.reason + ")." : ".")));
    }
    for (const item of state.quarantined.values()) {
      notices.push(el("li", { class: "notice quarantined", dataset: { jobId: item.jobId } },
        el("strong", { text: "Given up on job " + item.jobId + ": " }), item.reason || "no reason recorded"));
    }
    $("notices").replaceChildren(...notices);
  }

  // -- the viewer: full images, left/right/Escape --------------------------------------------------

  let viewing = null;

  function thumbs() {
    return Array.from(timeline.querySelectorAll("button.thumb"));
  }

  function show(button) {
    viewing = button;
    $("viewer-image").setAttribute("src", button.dataset.full);
    $("viewer-image").setAttribute("alt", button.dataset.caption || "");
    $("viewer-caption").textContent = button.dataset.caption || "";
    const all = thumbs();
    const at = all.indexOf(button);
    $("viewer-prev").disabled = at <= 0;
    $("viewer-next").disabled = at < 0 || at >= all.length - 1;
  }

  function openViewer(button) {
    show(button);
    $("viewer").hidden = false;
    $("viewer-close").focus();
  }

  function closeViewer() {
    if ($("viewer").hidden) return;
    $("viewer").hidden = true;
    $("viewer-image").removeAttribute("src");
    if (viewing && viewing.isConnected) viewing.focus();
    viewing = null;
  }

  function step(by) {
    const all = thumbs();
    const next = all[all.indexOf(viewing) + by];
    if (next) show(next);
  }

  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer-prev").addEventListener("click", () => step(-1));
  $("viewer-next").addEventListener("click", () => step(1));
  $("viewer").addEventListener("click", (event) => { if (event.target === $("viewer")) closeViewer(); });
  document.addEventListener("keydown", (event) => {
    if ($("viewer").hidden) return;
    if (event.key === "Escape") closeViewer();
    else if (event.key === "ArrowLeft") step(-1);
    else if (event.key === "ArrowRight") step(1);
    else return;
    event.preventDefault();
  });

  // -- the snapshot and the live stream -------------------------------------------------------------

  function onState(payload) {
    if (["connected", "disconnected", "auth_required", "token_needed"].includes(payload.state)) {
      state.connection = payload;
    } else if (payload.state === "gap") {
      state.gaps.push(payload);
    } else if (payload.state === "quarantined" && payload.jobId) {
      state.quarantined.set(payload.jobId, { jobId: payload.jobId, reason: payload.reason });
    }
    renderBanner();
  }

  function listen() {
    const source = new EventSource("api/events?since=" + encodeURIComponent(state.seq));
    state.source = source;
    const handle = (name, apply) => source.addEventListener(name, (event) => {
      apply(JSON.parse(event.data));
      if (event.lastEventId) state.seq = Number(event.lastEventId);
    });
    handle("job", (job) => { addJob(job, true); summarize(); renderBanner(); });
    handle("failed", (notice) => { addFailed(notice, true); summarize(); });
    handle("state", onState);
    handle("daemon", (daemon) => { state.daemon = daemon; renderBanner(); });
    handle("noop", () => {});
    source.addEventListener("reload", () => { source.close(); load(); });
    source.addEventListener("open", () => { state.stream = "live"; renderBanner(); });
    source.addEventListener("error", () => {
      state.stream = source.readyState === EventSource.CLOSED ? "gone" : "retrying";
      renderBanner();
    });
  }

  async function load() {
    let snapshot;
    try {
      const answer = await fetch("api/snapshot", { cache: "no-store" });
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      snapshot = await answer.json();
    } catch (error) {
      state.stream = "gone";
      renderBanner();
      return;
    }
    state.seq = snapshot.seq;
    state.jobs.clear();
    state.failed.clear();
    state.quarantined = new Map(snapshot.quarantined.map((item) => [item.jobId, item]));
    state.gaps = snapshot.gaps;
    state.connection = snapshot.connection;
    state.daemon = snapshot.daemon;
    state.stream = "connecting";
    timeline.replaceChildren();
    for (const job of snapshot.jobs) addJob(job, false);
    for (const notice of snapshot.failed) addFailed(notice, false);
    summarize();
    renderBanner();
    listen();
  }

  load();
})();
