// smtpgate's page: the buttons call the JSON API, then the page reloads to show the
// result; the page also reloads itself every few seconds while it is visible.
// Text from the server is only ever set with textContent, never as HTML.
"use strict";

const status = document.getElementById("status");

function say(text, failed) {
  if (!status) return;
  status.textContent = text;
  status.className = failed ? "failed" : "";
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const { job, action, query, confirm } = button.dataset;
  if (confirm && !window.confirm(confirm)) return;
  button.disabled = true;
  const url = `/api/jobs/${encodeURIComponent(job)}/${action}` + (query ? `?${query}` : "");
  try {
    const response = await fetch(url, {
      method: "POST",
      headers: { Accept: "application/json" },
      credentials: "same-origin",
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      say(body.error || `${response.status} ${response.statusText}`, true);
      button.disabled = false;
      return;
    }
    say(`${action}: ${body.changed} recipients changed; job is ${body.job.state}`, false);
    setTimeout(() => window.location.reload(), 800);
  } catch (error) {
    say(`cannot reach smtpgate: ${error}`, true);
    button.disabled = false;
  }
});

const signIn = document.getElementById("sign-in");
if (signIn) {
  signIn.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = new FormData(signIn).get("token");
    document.cookie =
      `smtpgate_token=${encodeURIComponent(token)}; path=/; SameSite=Strict`;
    window.location.reload();
  });
}

const refresh = Number(document.body.dataset.refresh || 0);
if (refresh > 0) {
  setInterval(() => {
    if (!document.hidden && !document.querySelector("button:disabled")) {
      window.location.reload();
    }
  }, refresh * 1000);
}
