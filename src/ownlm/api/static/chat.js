// The chat view: streamed answers over the WebSocket, personal and base side by side on request,
// feedback (thumbs, an edited answer) on every reply — the material the next round learns from — and,
// with memory on, the past conversations each reply drew on ("Remembered from", from the "start" event).

import { api, ChatSocket } from "./api.js";
import { el, flash } from "./ui.js";

const socket = new ChatSocket();
const state = {
  conversationId: null, // the current conversation, from the first "start" event
  lastPersonal: null, // id of the last personal answer: the next question continues from it
  baseModel: null, // the base model's name, from /v1/models
  memoryKnown: false, // the "Use memory" box was set from the user's memory setting
};

export function initChat() {
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    send();
  });
  // Enter sends, Shift+Enter writes a new line (what chat users expect)
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  document.getElementById("new-chat").addEventListener("click", newChat);
}

export async function showChat() {
  if (state.baseModel === null) {
    const models = await api("/v1/models");
    state.baseModel = models.data.map((m) => m.id).find((id) => id !== "ownlm") || "";
  }
  if (!state.memoryKnown) {
    // the box starts as the user's own setting (or the node's default); each question then says what it wants
    const memory = await api("/api/personalization/memory");
    document.getElementById("use-memory").checked = memory.enabled;
    state.memoryKnown = true;
  }
  document.getElementById("chat-input").focus();
}

export function resetChat() {
  socket.close();
  newChat();
  state.baseModel = null;
  state.memoryKnown = false;
}

function newChat() {
  state.conversationId = null;
  state.lastPersonal = null;
  document.getElementById("chat-log").replaceChildren();
}

async function send() {
  const input = document.getElementById("chat-input");
  const content = input.value.trim();
  if (!content) return;
  const compare = document.getElementById("compare").checked && state.baseModel;
  input.value = "";
  const button = document.getElementById("send");
  button.disabled = true;
  const turn = addTurn(content, compare);
  try {
    await askPersonal(content, turn.personal);
    if (compare) await askBase(turn.base);
  } catch (err) {
    flash(err.text || err.message, "error");
  } finally {
    button.disabled = false;
    input.focus();
  }
}

/** The personal model answers; the question is stored and continues the personal thread. */
async function askPersonal(content, card) {
  const message = { content, model: "ownlm" };
  if (state.conversationId) {
    message.conversation_id = state.conversationId;
    message.after = state.lastPersonal; // not a base answer: those are side branches
  }
  const done = await stream(message, card);
  state.lastPersonal = done.message_id;
}

/** The base model answers the same question as a sibling reply (no second copy of the question). */
async function askBase(card) {
  await stream({ reply_to: card.questionId(), model: state.baseModel }, card);
}

/** Send one turn and stream its tokens into `card`; resolves with the "done" event. */
async function stream(message, card) {
  message.max_tokens = Number(document.getElementById("max-tokens").value) || 256;
  message.memory = document.getElementById("use-memory").checked;
  card.setBusy(true);
  try {
    const done = await socket.ask(message, (ev) => {
      if (ev.type === "start") {
        state.conversationId = ev.conversation_id;
        card.turn.questionId = ev.message_id;
        card.remembered(ev.memory || []);
      } else if (ev.type === "token") {
        card.append(ev.content);
      }
    });
    card.finish(done.message_id);
    return done;
  } catch (err) {
    card.fail(err.text || err.message);
    throw err;
  } finally {
    card.setBusy(false);
  }
}

/** One exchange on screen: the question and one or two answer cards. */
function addTurn(content, compare) {
  const log = document.getElementById("chat-log");
  const turn = { questionId: null };
  const personal = answerCard(turn, "Your model");
  const base = compare ? answerCard(turn, `Base model (${state.baseModel})`) : null;
  const answers = el("div", { class: compare ? "answers two" : "answers" }, personal.node, base && base.node);
  log.append(el("div", { class: "turn" }, el("p", { class: "question" }, el("span", { class: "sr-only" }, "You: "), content), answers));
  return { personal, base };
}

/** An answer card: streamed text, then thumbs up/down and "edit the answer", sent to /feedback. */
function answerCard(turn, label) {
  const text = el("div", { class: "answer-text" });
  const note = el("p", { class: "note", role: "status" });
  const actions = el("div", { class: "actions", hidden: true });
  const memory = el("aside", { class: "memory", "aria-label": "Remembered from", hidden: true });
  const node = el("article", { class: "answer", "aria-label": label, "aria-busy": "true" },
    el("h3", {}, label), text, memory, actions, note);
  let messageId = null;

  const send = async (feedback, done) => {
    try {
      await api("/api/personalization/feedback", { method: "POST", body: { message_id: messageId, ...feedback } });
      note.textContent = done;
    } catch (err) {
      note.textContent = `Not saved: ${err.text || err.message}`;
    }
  };
  const thumb = (value, label, pressed) =>
    el("button", {
      type: "button", class: "icon", "aria-label": label, "aria-pressed": "false", title: label,
      onclick: (ev) => {
        actions.querySelectorAll("[aria-pressed]").forEach((b) => b.setAttribute("aria-pressed", "false"));
        ev.currentTarget.setAttribute("aria-pressed", "true");
        send({ thumbs: value }, value > 0 ? "Thanks: marked as a good answer." : "Noted: this answer will not be learned from.");
      },
    }, pressed);
  const edit = el("button", { type: "button", class: "secondary", onclick: () => openEditor() }, "Edit the answer");
  // text symbols, not emoji: many Linux machines have no emoji font and would show empty boxes
  actions.append(thumb(1, "Good answer", "✔ Good"), thumb(-1, "Bad answer", "✘ Bad"), edit);

  // The edit replaces the model's reply in training: the user writes what it should have said.
  function openEditor() {
    const id = `edit-${messageId}`;
    const area = el("textarea", { id, rows: 4 });
    area.value = text.textContent;
    const form = el("form", { class: "stack editor" },
      el("label", { for: id }, "Your better answer"), area,
      el("div", { class: "row" },
        el("button", { type: "submit" }, "Save edit"),
        el("button", { type: "button", class: "secondary", onclick: () => { form.remove(); edit.focus(); } }, "Cancel")));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      await send({ edited_content: area.value }, "Saved: your edit is what the model will learn.");
      text.textContent = area.value;
      text.classList.add("edited");
      form.remove();
      edit.focus();
    });
    actions.after(form);
    area.focus();
  }

  return {
    node,
    turn,
    questionId: () => turn.questionId,
    append: (piece) => text.append(piece),
    // the past conversations this reply's prompt drew on: a snippet of each (redacted by the node)
    remembered: (sources) => {
      memory.replaceChildren();
      memory.hidden = !sources.length;
      if (!sources.length) return;
      memory.append(el("h4", {}, "Remembered from"),
        el("ul", {}, sources.map((s) => el("li", { "data-conversation-id": s.conversation_id }, s.snippet))));
    },
    setBusy: (busy) => node.setAttribute("aria-busy", busy ? "true" : "false"),
    finish: (id) => {
      messageId = id;
      node.dataset.messageId = id;
      actions.hidden = false;
      if (!text.textContent) text.textContent = "(empty answer)";
    },
    fail: (why) => { note.textContent = `No answer: ${why}`; },
  };
}
