"""The chat tab: streamed answers with a thinking block, numbered citations, settings, stop and export.

The conversation lives in a per-session list of turns (``assistant.turns.ChatTurn``, in a gr.State); the chatbot's messages
are drawn from it on every update. The turns, not the chatbot, feed the model's history and the export, so
the thinking blocks and citation blocks the page shows never leak into the prompt.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import gradio as gr

from assistant.chat import Answer, Assistant
from assistant.conversations import ConversationStore, new_conversation_id
from assistant.model_loader import ModelLoader, public_model_name, short_model_name, with_hint
from assistant.turns import ChatTurn
from assistant.ui.markdown import passage_markdown
from engine.runtime import GenerationParams
from errors import ModelUnavailable, UserError
from knowledge import StoreError
from knowledge.embeddings import EmbeddingModelError

THINKING = "Thinking"
THINKING_OPEN_ENDED = "Thinking (never closed: the model stopped before it finished reasoning)"
UNCITED = "The answer cites none of the passages it was shown; they are listed below as retrieved, not cited."
NO_ANSWER = ("*No answer after the reasoning: the model ended while still thinking, most often at “Max new "
             "tokens”. Open the thinking block above to read it, or raise “Max new tokens” and ask again.*")
EARLIER_NO_ANSWER = "*No answer after the reasoning: the model stopped while still thinking.*"
STOPPED = "*(stopped)*"
EMPTY_STORE = ("No passages: the knowledge store is empty. Add documents in the Knowledge tab for cited answers, "
               "or turn off “Search my documents”.")
CUT_OFF = ("*(cut off: the page was closed or reloaded before this answer finished; what it had written is kept. "
           "Ask again for a whole answer.)*")
# At most ten page updates a second while an answer streams: the browser keeps up at any decode speed, and a
# click on Stop is not queued behind hundreds of redraws.
UPDATE_S = 0.1


def throttled(answers: Iterator[Answer], every: float = UPDATE_S) -> Iterator[Answer]:
    """One answer's stream with at most one update every ``every`` seconds; the first and the last always come.
    (An ``Answer`` grows in place, so the update sent holds everything streamed before it.)"""
    sent, skipped = 0.0, None
    for answer in answers:
        now = time.monotonic()
        if answer.done or now - sent >= every:
            sent, skipped = now, None
            yield answer
        else:
            skipped = answer
    if skipped is not None:
        yield skipped


class StopSwitches:
    """One stop switch per browser session, so that Stop ends that session's generation only."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def new(self, session: str) -> threading.Event:
        with self._lock:
            self._events[session] = event = threading.Event()
        return event

    def stop(self, session: str) -> None:
        with self._lock:
            event = self._events.get(session)
        if event is not None:
            event.set()


def request_user(request: gr.Request | None) -> str | None:
    """Who is asking: the login, None with logins off."""
    return getattr(request, "username", None) or None


def request_session(request: gr.Request | None) -> str:
    """The browser session a request comes from ("" outside one)."""
    return getattr(request, "session_hash", None) or ""


def model_history(turns: list[ChatTurn]) -> list[dict]:
    """The finished turns as {"role", "content"} messages: what the model is shown of the past."""
    messages = []
    for turn in turns:
        messages.append({"role": "user", "content": turn.question})
        if turn.answer:
            messages.append({"role": "assistant", "content": turn.answer})
    return messages


def turn_messages(turn: ChatTurn, index: int) -> list[gr.ChatMessage]:
    """A turn as chatbot messages: question, thinking block, answer with its model line, citations."""
    messages = [gr.ChatMessage(role="user", content=turn.question)]
    if turn.error:
        messages.append(gr.ChatMessage(content=f"**Cannot answer:**\n\n```\n{turn.error}\n```"))
        return messages
    for number, earlier in enumerate(turn.earlier, start=1):
        block = f"earlier-{index}-{number}"
        messages.append(gr.ChatMessage(content=earlier.answer or EARLIER_NO_ANSWER, metadata={
            "title": f"Earlier answer {number} (before “Try again”)", "id": block, "status": "done"}))
        if earlier.reasoning:
            messages.append(gr.ChatMessage(content=earlier.reasoning, metadata={
                "title": "Its reasoning", "parent_id": block, "status": "done"}))
    finished_thinking = turn.thinking_done or turn.done
    if turn.reasoning or not finished_thinking:
        title = THINKING if turn.thinking_done or not turn.done else THINKING_OPEN_ENDED
        metadata = {"title": title, "id": f"think-{index}", "status": "done" if finished_thinking else "pending"}
        if turn.seconds is not None:
            metadata["duration"] = round(turn.seconds, 1)
        messages.append(gr.ChatMessage(content=turn.reasoning or "…", metadata=metadata))
    if turn.answer or turn.done:
        if turn.cut_off:
            body = f"{turn.answer}\n\n{CUT_OFF}" if turn.answer else CUT_OFF
        elif turn.stopped:
            body = f"{marked_answer(turn.answer, turn.support)}\n\n{STOPPED}" if turn.answer else STOPPED
        else:
            body = marked_answer(turn.answer, turn.support) if turn.answer else NO_ANSWER
        if turn.done and turn.answer and turn.passages and not turn.citations:
            body += f"\n\n*{UNCITED}*"
        shown_none = not (turn.passages or turn.citations or turn.left_out)
        if turn.done and turn.retrieval and turn.prompt and shown_none:
            body += f"\n\n*{EMPTY_STORE}*"
        if turn.left_out:
            count = turn.left_out
            body += (f"\n\n*{count} retrieved passage{'s were' if count != 1 else ' was'} left out to fit the model's "
                     "context; lower “Max new tokens” to give passages more room.*")
        if turn.model:
            also = "".join(f"; also searched as “{passage_markdown(t)}”" for t in turn.translations)
            body += (f"\n\n<small>answered by {short_model_name(turn.model)} + adapter "
                     f"{turn.adapter or 'none'}{'' if turn.retrieval else ', without retrieval'}{also}</small>")
        messages.append(gr.ChatMessage(content=body))
    if turn.done:
        for passages, kind, title in ((turn.citations, "citations", "Sources"),
                                      (turn.passages, "passages", "Retrieved, not cited")):
            if passages:
                messages += passage_messages(passages, title, f"{kind}-{index}")
    return messages


def marked_answer(answer: str, support: list[dict]) -> str:
    """The answer with each sentence that its cited passage does not support marked, and why."""
    for check in support:
        if not check["supported"] and check["sentence"] in answer:
            answer = answer.replace(check["sentence"], f"{check['sentence']} ⚠️ *(unsupported: {check['note']})*", 1)
    return answer


def passage_messages(citations: list[dict], title: str, parent: str) -> list[gr.ChatMessage]:
    """A closed block of passages, each opening to its text."""
    count = len(citations)
    messages = [gr.ChatMessage(content="Open a source to read the passage.", metadata={
        "title": f"{title} ({count} passage{'s' if count != 1 else ''})", "id": parent, "status": "done"})]
    for citation in citations:
        messages.append(gr.ChatMessage(content=passage_markdown(citation["text"]), metadata={
            "title": citation["label"], "parent_id": parent, "status": "done"}))
    return messages


def chat_messages(turns: list[ChatTurn]) -> list[gr.ChatMessage]:
    return [m for index, turn in enumerate(turns) for m in turn_messages(turn, index)]


def conversation_export(turns: list[ChatTurn], source_paths: bool = False) -> dict:
    """The conversation as JSON: every turn with its reasoning, citations, model and adapter. Sources are file
    names unless ``source_paths`` (EXPORT_SOURCE_PATHS)."""

    def passage(citation: dict) -> dict:
        shown = {k: citation[k] for k in ("number", "source", "page", "text")}
        return shown if source_paths else {**shown, "source": PurePosixPath(citation["source"]).name}

    messages = []
    for turn in turns:
        messages.append({"role": "user", "content": turn.question})
        if turn.done and not turn.error:
            messages.append({"role": "assistant", "content": turn.answer, "reasoning": turn.reasoning,
                             "citations": [passage(c) for c in turn.citations],
                             "passages": [passage(c) for c in turn.passages],
                             "support": turn.support,
                             "model": public_model_name(turn.model), "adapter": turn.adapter,
                             "retrieval": turn.retrieval,
                             "params": turn.params, "stopped": turn.stopped,
                             "thinking_closed": turn.thinking_done})
    return {"format": "think-rag conversation", "version": 1,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "messages": messages}


class ConversationExports:
    """The chat's exports: one JSON file per browser session, rewritten after each turn, all in one temporary
    folder of this app's. close() removes the folder: the app calls it at shutdown, and at exit at the latest.
    (Gradio serves each export from a copy in its own cache, which its delete_cache bounds.)"""

    def __init__(self, source_paths: bool = False):
        self.source_paths = source_paths
        self.folder = Path(tempfile.mkdtemp(prefix="think-rag-exports-"))
        atexit.register(self.close)

    def write(self, turns: list[ChatTurn], session: str) -> str | None:
        """The session's conversation as a file to download; None before its first question."""
        if not turns:
            return None
        # The session hash comes from the browser: hashed, it cannot name a path outside the folder.
        folder = self.folder / hashlib.sha256(session.encode()).hexdigest()[:32]
        folder.mkdir(exist_ok=True)
        started = time.strftime("%Y%m%d-%H%M%S", time.gmtime(turns[0].started_at))
        path = folder / f"conversation-{started}.json"
        for earlier in folder.glob("*.json"):  # the session's previous conversation, before "New chat"
            if earlier != path:
                earlier.unlink()
        exported = conversation_export(turns, self.source_paths)
        path.write_text(json.dumps(exported, ensure_ascii=False, indent=2), encoding="utf-8")
        return str(path)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class ChatTab:
    """``conversations`` keeps each conversation as it grows (None: the store could not be opened, and the chat
    works as before, without saving)."""

    def __init__(self, assistant: Assistant, loader: ModelLoader, conversations: ConversationStore | None = None):
        self.assistant, self.loader, self.conversations = assistant, loader, conversations
        self.switches = StopSwitches()
        self.exports = ConversationExports(assistant.settings.export_source_paths)

    def keep(self, turns: list[ChatTurn], conversation: str | None, request: gr.Request) -> None:
        """Save the conversation as it stands (nothing before its first question)."""
        if self.conversations is not None and conversation and turns:
            self.conversations.save(conversation, request_user(request), turns)

    @staticmethod
    def begin(message: str, conversation: str | None) -> tuple[str | None, str | None]:
        """The id of the conversation a question goes into: the open one, or a new one for the first question."""
        conversation = conversation or (new_conversation_id() if (message or "").strip() else None)
        return conversation, conversation

    def respond(self, message: str, turns: list[ChatTurn], temperature: float, max_new_tokens: float,
                use_retrieval: bool, conversation: str | None = None, request: gr.Request = None):
        """Stream the answer to `message`, given the session's earlier turns: (chatbot, turns, question box,
        conversation id). The conversation is saved when the question is asked and when the answer ends, or is
        cut off (the page closed or reloaded: what was written so far is kept, marked as cut off on reopening)."""
        question = (message or "").strip()
        if not question:
            yield chat_messages(turns), turns, message, conversation
            return
        conversation = conversation or new_conversation_id()
        params = GenerationParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature))
        history = model_history(turns)
        turn = ChatTurn.asked(question, params, bool(use_retrieval))
        turns = [*turns, turn]
        stop = self.switches.new(request_session(request))
        self.keep(turns, conversation, request)
        try:
            yield chat_messages(turns), turns, "", conversation
            if self.loader.wait() is None:
                turn.error, turn.done = self.loader.error, True
                yield chat_messages(turns), turns, "", conversation
                return
            try:
                for answer in throttled(self.assistant.stream_answer(
                        [*history, {"role": "user", "content": question}], params, use_retrieval=bool(use_retrieval),
                        stop=stop)):
                    turn.record(answer, stop.is_set())
                    yield chat_messages(turns), turns, "", conversation
            except ModelUnavailable as e:
                turn.error = with_hint(str(e))
            except (StoreError, EmbeddingModelError) as e:
                turn.error = f"{e}\nTurn off “Search my documents” to answer without the knowledge store."
            except UserError as e:
                turn.error = str(e)
            turn.done = True
            yield chat_messages(turns), turns, "", conversation
        finally:
            self.keep(turns, conversation, request)

    def stop(self, request: gr.Request) -> None:
        self.switches.stop(request_session(request))

    def export(self, turns: list[ChatTurn], request: gr.Request):
        path = self.exports.write(turns, request_session(request))
        return gr.DownloadButton(value=path, interactive=path is not None)

    def build(self, settings, remembered: gr.BrowserState | None = None) -> None:
        """The tab; ``remembered``: where the browser keeps the open conversation's id across reloads."""
        turns = gr.State([])
        with gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label="Conversation", height=560, elem_id="chatbot", buttons=["copy"],
                                     placeholder="Ask about your documents. Answers cite passages by number.")
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask a question and press Enter", show_label=False,
                                          scale=6, elem_id="question", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            with gr.Column(scale=1, min_width=240):
                use_retrieval = gr.Checkbox(True, label="Search my documents (retrieval)", elem_id="retrieval",
                                            info="Off: the model answers from what it knows, without citations.")
                temperature = gr.Slider(0.0, 1.5, value=settings.temperature, step=0.05, label="Temperature",
                                        info="0 always picks the likeliest token.")
                max_new_tokens = gr.Slider(8, settings.context_length, value=settings.max_new_tokens, step=8,
                                           label="Max new tokens", elem_id="max-new-tokens",
                                           info="Reasoning and answer together; at most what the model's context "
                                                "leaves after the prompt.")
                new_chat = gr.Button("New chat", elem_id="new-chat")
                export = gr.DownloadButton("Export conversation (JSON)", value=None, interactive=False,
                                           elem_id="export")

        conversation = gr.State(None)  # the id of the conversation on the page (None before its first question)
        inputs = [question, turns, temperature, max_new_tokens, use_retrieval, conversation]
        outputs = [chatbot, turns, question, conversation]
        model_events = dict(concurrency_limit=settings.gpu_concurrency, concurrency_id="model")
        # The conversation's id is given before the answer starts, and kept in the browser at once, so that a
        # reload in the middle of the answer reopens it.
        remembered = [remembered] if remembered is not None else []
        started = gr.on([question.submit, send.click], self.begin, [question, conversation],
                        [conversation, *remembered], queue=False, api_visibility="private")
        answered = started.then(self.respond, inputs, outputs, api_name="chat", **model_events)
        answered.then(self.export, turns, export, api_visibility="private", queue=False)
        stop.click(self.stop, None, None, queue=False, api_visibility="private")
        cleared = [trigger(lambda: ([], [], gr.DownloadButton(value=None, interactive=False), None, None), None,
                           [chatbot, turns, export, conversation, *remembered], queue=False,
                           api_visibility="private")
                   for trigger in (new_chat.click, chatbot.clear)]
        # What the feedback controls (assistant/ui/feedback.py) act on, and the events they follow.
        self.chatbot, self.turns, self.temperature, self.max_new_tokens = chatbot, turns, temperature, max_new_tokens
        self.answered, self.cleared, self.conversation, self.export_button = answered, cleared, conversation, export
