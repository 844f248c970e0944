"""The conversations sidebar: each person's saved chats (``assistant/conversations.py``) to reopen, rename or
delete; the open one comes back after a page reload. Exporting is the chat's own Export button, on the
conversation that is open.

The page remembers which conversation is open in the browser's storage (``gr.BrowserState``); a reload reads
it back and reopens that conversation from the store. An answer the reload cut off is marked so, not dropped.
"""

from __future__ import annotations

import gradio as gr

from assistant.conversations import ConversationError, ConversationStore
from assistant.turns import ChatTurn
from assistant.ui.chat import ChatTab, chat_messages, request_user
from assistant.ui.errors import Refusal

# The browser keeps only the open conversation's id, encrypted with this key; the id is a random UUID and the
# store answers only its owner, so a fixed key (the same after an app restart) gives nothing away.
BROWSER_KEY = "think-rag-conversation"



def reopened(turns: list[ChatTurn]) -> list[ChatTurn]:
    """Turns as reopened: an answer still being written when the conversation was last saved is cut off."""
    for turn in turns:
        if not turn.done:
            turn.done, turn.cut_off, turn.prompt = True, True, None
    return turns


class ConversationsPanel:
    def __init__(self, chat: ChatTab, store: ConversationStore | None, error: str | None = None):
        self.chat, self.store, self.error = chat, store, error

    def _need(self) -> ConversationStore:
        if self.store is None:
            raise Refusal(f"Conversations are not saved: {self.error}")
        return self.store

    def listing(self, current: str | None, request: gr.Request):
        """The sidebar: every conversation of this person, the open one selected, and its name in the box."""
        if self.store is None:
            return gr.Radio(choices=[], value=None, info=f"Not saved: {self.error}"), ""
        summaries = self.store.list(request_user(request))
        title = next((s.title for s in summaries if s.id == current), "")
        choices = [(s.title, s.id) for s in summaries]
        return gr.Radio(choices=choices, value=current if title else None,
                        info=None if choices else "Your conversations are listed here once you ask something."), title

    def open(self, conversation: str | None, request: gr.Request):
        """(chatbot, turns, conversation id, the id the browser keeps) of the conversation chosen in the list."""
        try:
            return self._opened(conversation, request)
        except ConversationError as e:
            raise Refusal(str(e)) from None

    def restore(self, remembered: str | None, request: gr.Request):
        """On page load: the conversation that was open before the reload, if it is still there."""
        try:
            return self._opened(remembered, request)
        except ConversationError:  # deleted meanwhile (in another tab): the page starts afresh
            return [], [], None, None

    def _opened(self, conversation: str | None, request: gr.Request | None):
        if not conversation or self.store is None:
            return [], [], None, None
        turns = reopened(self.store.load(conversation, request_user(request)))
        return chat_messages(turns), turns, conversation, conversation

    def rename(self, conversation: str | None, title: str, request: gr.Request):
        if not conversation:
            raise Refusal("Open a conversation first (ask something, or choose one in the list).")
        try:
            self._need().rename(conversation, request_user(request), title or "")
        except ConversationError as e:
            raise Refusal(str(e)) from None
        return self.listing(conversation, request)

    def delete(self, conversation: str | None, request: gr.Request):
        """Delete the open conversation; the chat starts afresh."""
        if not conversation:
            raise Refusal("Open a conversation first (choose one in the list).")
        try:
            self._need().delete(conversation, request_user(request))
        except ConversationError as e:
            raise Refusal(str(e)) from None
        return [], [], None, None, *self.listing(None, request)

    def build_sidebar(self) -> None:
        with gr.Sidebar(label="Conversations", open=True, elem_id="conversations"):
            gr.Markdown("### Conversations")
            self.list = gr.Radio(choices=[], label="Yours, the latest first", elem_id="conversation-list")
            self.title = gr.Textbox(label="Name of the open conversation", elem_id="conversation-title")
            with gr.Row():
                self.rename_button = gr.Button("Rename", size="sm", elem_id="conversation-rename")
                self.delete_button = gr.Button("Delete", size="sm", variant="stop", elem_id="conversation-delete")
        # Outside the sidebar: the chat tab writes it too (``ChatTab.build``).
        self.remembered = gr.BrowserState(None, storage_key=BROWSER_KEY, secret=BROWSER_KEY)

    def wire(self, demo: gr.Blocks) -> None:
        """The sidebar's events, on the chat's components (after ``ChatTab.build``). Opening and deleting count as
        clearing the chat, so the feedback controls start afresh on them too."""
        chat = self.chat
        shown = [chat.chatbot, chat.turns, chat.conversation, self.remembered]
        sidebar = [self.list, self.title]
        private = dict(api_visibility="private", queue=False)
        afresh = list(chat.cleared)  # New chat and the chatbot's clear
        opened = self.list.input(self.open, self.list, shown, **private)
        deleted = self.delete_button.click(self.delete, chat.conversation, [*shown, *sidebar], **private)
        chat.cleared += [opened, deleted]
        self.rename_button.click(self.rename, [chat.conversation, self.title], sidebar, **private)
        for event in (chat.answered, opened, *afresh):
            event.then(self.listing, chat.conversation, sidebar, **private)
        demo.load(self.restore, self.remembered, shown, **private).then(
            self.listing, chat.conversation, sidebar, **private)
