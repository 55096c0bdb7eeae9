// Stork's web UI script: live updates from the API's event stream, and forms and buttons
// sent to the JSON API with the session cookie (plus the x-stork-ui header the API wants
// with a cookie). Pages are rendered by the server; this only swaps parts of them.
"use strict";

(function () {
  const body = document.body;
  const pageName = body.dataset.page;
  if (!pageName || pageName === "login" || pageName === "error") return;

  // ---- the API ----

  async function api(method, path, payload) {
    const init = {
      method,
      credentials: "same-origin",
      headers: { "x-stork-ui": "1" },
    };
    if (payload !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(payload);
    }
    const r = await fetch("/api/v1" + path, init);
    if (r.status === 401) {
      // The token expired or was revoked: the server ends the session at the login page.
      location.assign("/ui/login?why=expired");
      throw new Error("logged out");
    }
    let data = null;
    const text = await r.text();
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = { message: text }; }
    return { ok: r.ok, status: r.status, data };
  }

  function message(res) {
    return (res.data && res.data.message) || "HTTP " + res.status;
  }

  // Which field an API error names: "hostname: ...", "ssh_keys[1]: ...", serde's
  // "missing field `image`", or axum's "...target type: target: unknown variant ...".
  function fieldOf(msg) {
    const path = "([a-z_]+(?:\\[\\d+\\])?(?:\\.[a-z_]+)*)";
    let m = new RegExp("^" + path + ": ").exec(msg) ||
      /(?:unknown|missing|duplicate) field `([a-z_]+)`/.exec(msg) ||
      new RegExp("target type: " + path + ": ").exec(msg);
    return m ? m[1].replace(/\[\d+\]/g, "") : null;
  }

  function clearErrors(form) {
    form.querySelectorAll(".field-error, .form-error").forEach((e) => { e.textContent = ""; });
    form.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
  }

  function showError(form, msg) {
    let field = fieldOf(msg);
    let slot = field && form.querySelector('.field-error[data-field="' + field + '"]');
    // `layout.x` without a slot of its own goes to `layout`'s.
    while (field && !slot && field.includes(".")) {
      field = field.slice(0, field.lastIndexOf("."));
      slot = form.querySelector('.field-error[data-field="' + field + '"]');
    }
    if (slot) {
      slot.textContent = msg;
      const input = form.querySelector('[name="' + field + '"]');
      if (input) { input.setAttribute("aria-invalid", "true"); input.focus(); }
      return;
    }
    const general = form.querySelector(".form-error");
    if (general) general.textContent = msg; else alert(msg);
  }

  // ---- live updates ----

  const live = document.getElementById("live");
  function setLive(state) {
    if (!live) return;
    live.dataset.state = state;
    const label = live.querySelector(".label");
    if (label) label.textContent = state;
  }

  let pending = null;
  let inFlight = false;
  let again = false;
  function scheduleRefresh() {
    if (pending) return;
    pending = setTimeout(() => { pending = null; refresh(); }, 60);
  }

  async function refresh() {
    if (inFlight) { again = true; return; }
    inFlight = true;
    try {
      if (pageName === "machines") await refreshList();
      else if (pageName === "machine") await refreshMachine();
    } catch (e) {
      console.warn("refresh failed", e);
    } finally {
      inFlight = false;
      if (again) { again = false; scheduleRefresh(); }
    }
  }

  async function fetchFragment() {
    const url = new URL(location.href);
    url.searchParams.set("fragment", "1");
    const r = await fetch(url, { credentials: "same-origin" });
    if (r.redirected && new URL(r.url).pathname === "/ui/login") {
      location.assign(r.url);
      return null;
    }
    if (!r.ok) return null;
    return r.text();
  }

  const selected = new Set();

  async function refreshList() {
    const html = await fetchFragment();
    const list = document.getElementById("list");
    if (html === null || !list) return;
    const before = new Map();
    list.querySelectorAll("tr.machine").forEach((tr) => before.set(tr.dataset.machineId, tr.innerHTML));
    list.innerHTML = html;
    list.querySelectorAll("tr.machine").forEach((tr) => {
      const id = tr.dataset.machineId;
      const box = tr.querySelector("input.select");
      if (box && selected.has(id)) box.checked = true;
      if (before.get(id) !== tr.innerHTML) tr.classList.add("flash");
    });
    updateBulkCount();
  }

  async function refreshMachine() {
    const html = await fetchFragment();
    const detail = document.getElementById("detail");
    if (html === null || !detail) return;
    // A half-filled deploy form stays as the user left it.
    const oldForm = document.getElementById("deploy-form");
    const active = document.activeElement;
    const tpl = document.createElement("div");
    tpl.innerHTML = html;
    const newForm = tpl.querySelector("#deploy-form");
    if (oldForm && newForm) newForm.replaceWith(oldForm);
    detail.replaceChildren(...tpl.childNodes);
    if (active && document.body.contains(active)) active.focus();
  }

  function connect() {
    const url = new URL("/api/v1/events/stream", location.origin);
    url.searchParams.set("after", body.dataset.after || "0");
    const machine = document.getElementById("machine");
    if (pageName === "machine" && machine) url.searchParams.set("machine", machine.dataset.machineId);
    const es = new EventSource(url, { withCredentials: true });
    es.onopen = () => setLive("live");
    es.onmessage = (ev) => {
      if (ev.lastEventId) body.dataset.after = ev.lastEventId;
      scheduleRefresh();
    };
    es.onerror = async () => {
      setLive("offline");
      if (es.readyState === EventSource.CLOSED) {
        // Closed for good (a refused session, or the appliance restarted): check the
        // session, then connect again from the last event seen.
        const r = await fetch(location.href, { credentials: "same-origin" }).catch(() => null);
        if (r && r.redirected && new URL(r.url).pathname === "/ui/login") {
          location.assign(r.url);
          return;
        }
        setTimeout(connect, 3000);
      }
    };
  }
  if (pageName === "machines" || pageName === "machine") connect();
  else setLive("live");

  // ---- the machines page: selection and bulk actions ----

  function updateBulkCount() {
    const count = document.getElementById("bulk-count");
    if (count) count.textContent = selected.size + " selected";
  }

  document.addEventListener("change", (ev) => {
    const t = ev.target;
    if (t.matches("input.select")) {
      if (t.checked) selected.add(t.value); else selected.delete(t.value);
      updateBulkCount();
    } else if (t.id === "select-all") {
      document.querySelectorAll("#machines input.select").forEach((box) => {
        box.checked = t.checked;
        if (t.checked) selected.add(box.value); else selected.delete(box.value);
      });
      updateBulkCount();
    }
  });

  // A deploy asked of a Ready machine is checked first (`dry_run`: a 400 names the field
  // and nothing changes), then the machine is allocated and deployed.
  async function deployOne(id, request, status) {
    const path = "/machines/" + id + "/deploy";
    if (status === "ready") {
      const check = await api("POST", path + "?dry_run=true", request);
      if (!check.ok) return check;
      const alloc = await api("POST", "/machines/" + id + "/allocate", {});
      if (!alloc.ok) return alloc;
    }
    return api("POST", path, request);
  }

  function rowStatus(id) {
    const tr = document.querySelector('tr.machine[data-machine-id="' + id + '"]');
    return tr ? tr.dataset.status : "ready";
  }

  const BULK = {
    commission: (id) => api("POST", "/machines/" + id + "/commission", {}),
    release: (id) => api("POST", "/machines/" + id + "/release", {}),
    "power-on": (id) => api("POST", "/machines/" + id + "/power/on"),
    "power-off": (id) => api("POST", "/machines/" + id + "/power/off"),
    "mark-broken": (id, extra) => api("POST", "/machines/" + id + "/mark-broken", { reason: extra }),
    deploy: (id, extra) => deployOne(id, { image: extra }, rowStatus(id)),
  };

  async function bulk(action) {
    const out = document.getElementById("bulk-result");
    const ids = [...selected];
    if (!ids.length) { out.textContent = "Select machines first."; return; }
    let extra;
    if (action === "deploy") {
      extra = prompt("Image to deploy on " + ids.length + " machine(s):");
      if (!extra) return;
    } else if (action === "mark-broken") {
      extra = prompt("Why are they broken?") || undefined;
    }
    out.textContent = action + "…";
    const failures = [];
    for (const id of ids) {
      const res = await BULK[action](id, extra);
      if (!res.ok) failures.push(id + ": " + message(res));
    }
    out.textContent = (ids.length - failures.length) + " of " + ids.length + " done" +
      (failures.length ? "; refused: " + failures.join("; ") : "");
    scheduleRefresh();
  }

  // ---- buttons ----

  document.addEventListener("click", async (ev) => {
    const b = ev.target.closest("button");
    if (!b) return;
    if (b.dataset.bulk) { ev.preventDefault(); await bulk(b.dataset.bulk); return; }
    const out = document.getElementById("action-result");
    const id = b.dataset.machine;
    let res = null;
    if (b.dataset.action && id) {
      const action = b.dataset.action;
      if (action === "delete") {
        if (!confirm("Delete this machine and its history?")) return;
        res = await api("DELETE", "/machines/" + id);
        if (res.ok) { location.assign("/ui/machines"); return; }
      } else if (action === "release") {
        const erase = document.getElementById("release-erase");
        res = await api("POST", "/machines/" + id + "/release", erase ? { erase: erase.checked } : {});
      } else if (action === "mark-broken") {
        const reason = prompt("Why is it broken?");
        if (reason === null) return;
        res = await api("POST", "/machines/" + id + "/mark-broken", reason ? { reason } : {});
      } else {
        res = await api("POST", "/machines/" + id + "/" + action, {});
      }
    } else if (b.dataset.power && id) {
      res = await api("POST", "/machines/" + id + "/power/" + b.dataset.power);
      if (res.ok && out) out.textContent = "";
    } else if (b.dataset.revoke) {
      if (!confirm("Revoke token " + b.dataset.revoke + "?")) return;
      res = await api("DELETE", "/tokens/" + b.dataset.revoke);
      if (res.ok) { location.reload(); return; }
    } else if (b.dataset.deleteKey) {
      res = await api("DELETE", "/ssh-keys/" + b.dataset.deleteKey);
      if (res.ok) { location.reload(); return; }
    } else {
      return;
    }
    if (res && !res.ok) {
      if (out) out.textContent = message(res); else alert(message(res));
    } else if (out) {
      out.textContent = "";
    }
    scheduleRefresh();
  });

  // ---- forms ----

  function fields(form) {
    const data = {};
    new FormData(form).forEach((v, k) => { data[k] = typeof v === "string" ? v.trim() : v; });
    return data;
  }

  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (!["deploy-form", "key-form", "token-form"].includes(form.id)) return;
    ev.preventDefault();
    clearErrors(form);
    const f = fields(form);
    const submit = form.querySelector("button[type=submit]");
    if (submit) submit.disabled = true;
    try {
      let res;
      if (form.id === "deploy-form") {
        const request = { image: f.image || "", target: f.target || "disk" };
        if (f.hostname) request.hostname = f.hostname;
        if (f.disk) request.disk = f.disk;
        if (f.kernel) request.kernel = f.kernel;
        if (f.user_data) request.user_data = f.user_data;
        const layout = {};
        for (const k of ["esp_mib", "root_mib"]) {
          const v = f["layout." + k];
          // A number goes as one; anything else as typed, for the API to name.
          if (v) layout[k] = /^\d+$/.test(v) ? Number(v) : v;
        }
        if (Object.keys(layout).length) request.layout = layout;
        const keys = (f.ssh_keys || "").split("\n").map((k) => k.trim()).filter(Boolean);
        if (keys.length) request.ssh_keys = keys;
        res = await deployOne(form.dataset.machine, request, form.dataset.status);
        if (res.ok) scheduleRefresh();
      } else if (form.id === "key-form") {
        res = await api("POST", "/ssh-keys", { name: f.name || "", key: f.key || "" });
        if (res.ok) { location.reload(); return; }
      } else {
        const request = { description: f.description || "", scope: f.scope };
        if (f.expires_in_secs) {
          const n = Number(f.expires_in_secs);
          if (!Number.isInteger(n) || n < 1) {
            showError(form, "expires_in_secs: a whole number of seconds, 1 or more");
            return;
          }
          request.expires_in_secs = n;
        }
        res = await api("POST", "/tokens", request);
        if (res.ok) {
          document.getElementById("new-token-value").textContent = res.data.token;
          document.getElementById("new-token").hidden = false;
          form.reset();
          return;
        }
      }
      if (!res.ok) showError(form, message(res));
    } finally {
      if (submit) submit.disabled = false;
    }
  });
})();
