// Reload the page when a new capture lands or a running capture finishes (polling, no external scripts).
(function () {
  const status = document.getElementById("status");
  if (!status) return;
  const known = Number(status.dataset.captures);
  const wasBusy = status.dataset.busy === "1";
  async function poll() {
    try {
      const r = await fetch("/api/health", { headers: { Accept: "application/json" } });
      const h = await r.json();
      if (h.store.captures !== known || (wasBusy && !h.busy)) { location.reload(); return; }
    } catch (e) { /* the appliance may be restarting; try again */ }
    setTimeout(poll, 2000);
  }
  setTimeout(poll, 2000);
})();
