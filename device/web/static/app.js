// LeukoCam dashboard: no external scripts. Every POST carries the CSRF token from the page's meta tag.
(function () {
  "use strict";
  const meta = document.querySelector('meta[name="csrf-token"]');
  const token = meta ? meta.content : "";

  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": token, Accept: "application/json" },
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await r.json(); } catch (e) { /* not JSON */ }
    if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
    return data;
  }

  // -- Live page: preview refresh, Capture without reload, newest result by polling --------------------
  const preview = document.getElementById("preview");
  if (preview) {
    let loading = false;
    preview.addEventListener("load", function () { loading = false; });
    preview.addEventListener("error", function () { loading = false; });
    setInterval(function () {
      if (loading || document.hidden) return;
      loading = true;
      preview.src = preview.dataset.src + "?t=" + Date.now();
    }, 1000);
  }
  const wrap = document.getElementById("latest-wrap");
  const button = document.getElementById("capture");
  const statusEl = document.getElementById("status");
  let progressEl = document.getElementById("progress");
  if (wrap) {
    let shown = (document.getElementById("latest") || {}).dataset?.captureId || "";
    async function refresh() {
      try {
        const r = await fetch("/api/latest", { headers: { Accept: "application/json" }, credentials: "same-origin" });
        if (r.ok) {
          const s = await r.json();
          if (button) { button.disabled = s.busy; button.textContent = s.busy ? "Capturing…" : "Capture"; }
          if (statusEl && s.last_error) statusEl.textContent = s.last_error;
          if (s.latest_id !== null && String(s.latest_id) !== shown) {
            const f = await fetch(wrap.dataset.fragment, { credentials: "same-origin" });
            if (f.ok) { wrap.innerHTML = await f.text(); shown = String(s.latest_id); }
            if (progressEl) {  // the slide's count, blast % and decision, updated with each result
              const p = await fetch(progressEl.dataset.fragment, { credentials: "same-origin" });
              if (p.ok) { progressEl.outerHTML = await p.text(); progressEl = document.getElementById("progress"); }
            }
          }
        }
      } catch (e) { /* the appliance may be restarting; try again */ }
      setTimeout(refresh, 1500);
    }
    setTimeout(refresh, 1500);
    const form = document.getElementById("capture-form");
    if (form) form.addEventListener("submit", async function (ev) {
      ev.preventDefault();
      button.disabled = true; button.textContent = "Capturing…";
      try { await post("/api/capture"); } catch (e) { if (statusEl) statusEl.textContent = e.message; }
    });
  }

  const printButton = document.getElementById("print");
  if (printButton) printButton.addEventListener("click", function () { window.print(); });

  // -- Capture page: zoom the field, show or hide the evidence overlay ---------------------------------
  const zoom = document.getElementById("zoom");
  const scroller = document.getElementById("field-scroll");
  if (zoom && scroller) {
    zoom.addEventListener("click", function () {
      const on = !scroller.classList.contains("zoomed");
      scroller.classList.toggle("zoomed", on);
      scroller.querySelector(".field-wrap").style.width = on ? scroller.dataset.fieldWidth + "px" : "";
      zoom.setAttribute("aria-pressed", on ? "true" : "false");
      zoom.textContent = on ? "fit the field to the screen" : "zoom the field";
    });
  }
  const overlay = document.getElementById("overlay-toggle");
  const cellBox = document.getElementById("review-cells");
  if (overlay && cellBox) {
    overlay.addEventListener("click", function () {
      const hidden = cellBox.classList.toggle("no-overlay");
      overlay.setAttribute("aria-pressed", hidden ? "false" : "true");
      overlay.textContent = hidden ? "show evidence overlay" : "hide evidence overlay";
    });
  }

  // -- Capture page: keyboard review ---------------------------------------------------------------
  const cells = Array.from(document.querySelectorAll("#review-cells figure.cell"));
  if (cells.length) {
    let current = Math.max(0, cells.findIndex(function (c) { return "#" + c.id === location.hash; }));
    function select(i) {
      current = (i + cells.length) % cells.length;
      cells.forEach(function (c, j) { c.classList.toggle("selected", j === current); });
      cells[current].focus({ preventScroll: true });
      cells[current].scrollIntoView({ block: "nearest" });
      history.replaceState(null, "", "#" + cells[current].id);
    }
    async function review(label) {
      const fig = cells[current];
      try {
        const row = await post("/api/cells/" + fig.dataset.cellId + "/review", { label: label });
        fig.querySelector(".verdict").textContent = "reviewed: " + row.label + " by " + row.reviewer;
        // the card and its box follow the current verdict
        fig.classList.remove("review", "blast", "normal");
        fig.classList.add(row.label);
        const todo = fig.querySelector(".warn");
        if (todo) todo.remove();
        const box = document.getElementById("box-" + fig.dataset.cellId);
        if (box) box.setAttribute("class", "box " + row.label);
        const tbody = document.querySelector("#history tbody");
        if (tbody) {
          const tr = document.createElement("tr");
          [row.created_at, "#" + fig.dataset.idx, row.label, row.model_label, row.action, row.reviewer].forEach(function (v) {
            const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
          });
          tbody.appendChild(tr);
        }
        if (current < cells.length - 1) select(current + 1);
      } catch (e) { alert("review not saved: " + e.message); }
    }
    select(current);
    cells.forEach(function (c, i) { c.addEventListener("click", function () { select(i); }); });
    document.addEventListener("keydown", function (ev) {
      if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
      const tag = (ev.target.tagName || "").toLowerCase();
      if (tag === "input" || tag === "textarea" || tag === "select") return;
      const keys = { j: function () { select(current + 1); }, k: function () { select(current - 1); },
        b: function () { review("blast"); }, n: function () { review("normal"); }, c: function () { review("confirm"); } };
      if (keys[ev.key]) { ev.preventDefault(); keys[ev.key](); }
    });
    document.querySelectorAll("#review-cells form.review-buttons").forEach(function (f, i) {
      f.addEventListener("submit", function (ev) {
        ev.preventDefault();
        select(i);
        review(ev.submitter ? ev.submitter.value : "confirm");
      });
    });
  }
})();
