// The dashboard's entry point: sign in, route between views by the URL hash, sign out.
// Every view loads its data through the user's token; nothing is cached between users.

import { api, token } from "./api.js";
import { initChat, resetChat, showChat } from "./chat.js";
import { initData, showData } from "./data.js";
import { showLearning } from "./plot.js";
import { flash } from "./ui.js";
import { initModels, initPrivacy, initStatus, showModels, showPrivacy, showStatus, stopStatus } from "./views.js";

const VIEWS = {
  chat: showChat,
  status: showStatus,
  models: showModels,
  learning: showLearning,
  privacy: showPrivacy,
  data: showData,
};

function init() {
  document.getElementById("login-form").addEventListener("submit", login);
  document.getElementById("logout").addEventListener("click", logout);
  window.addEventListener("hashchange", route);
  // a 401 anywhere (token revoked, node restarted with another store) sends the user back to sign in
  window.addEventListener("ownlm:unauthorized", () => logout("Your token is no longer valid; sign in again."));
  initChat();
  initStatus();
  initModels();
  initPrivacy();
  initData();
  route();
}

async function login(ev) {
  ev.preventDefault();
  const input = document.getElementById("token");
  const error = document.getElementById("login-error");
  token.set(input.value.trim());
  try {
    await api("/api/personalization/privacy"); // any authenticated read checks the token
  } catch (err) {
    token.clear();
    flash(""); // the 401 also raised the "no longer valid" banner: the alert below says it better here
    error.textContent = err.status === 401 ? "That token is not valid on this node." : err.text;
    error.hidden = false;
    return;
  }
  input.value = "";
  error.hidden = true;
  flash(""); // a banner from the previous session ("token no longer valid", "Signed out.") is over now
  if (location.hash && location.hash !== "#login") route();
  else location.hash = "#chat";
}

function logout(message) {
  token.clear();
  resetChat();
  flash(typeof message === "string" ? message : "Signed out.");
  location.hash = "#login";
  route();
}

/** Show the view named by the hash (the login view without a token) and load its data. */
async function route() {
  stopStatus();
  const signedIn = Boolean(token.get());
  let name = location.hash.slice(1);
  if (!signedIn) name = "login";
  else if (!VIEWS[name]) name = "chat";
  document.getElementById("nav").hidden = !signedIn;
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${name}`;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.getAttribute("href") === `#${name}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (name === "login") {
    document.getElementById("token").focus();
    return;
  }
  try {
    await VIEWS[name]();
  } catch (err) {
    flash(err.text || err.message, "error");
  }
}

init();
