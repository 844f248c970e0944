"""Feedback in the chat: thumbs up or down, "try again" and pick the better answer, or write a better one.

Each becomes preference data in the pairs store through ``assistant.feedback``. Every action works on a turn
of the session's conversation (the chat tab's ``turns`` state) and is reachable two ways: from the chatbot's own
buttons (like, retry) and the controls below it, and as named API endpoints (``/vote``, ``/try_again``,
``/pick``, ``/edit_answer``) that take the turn's number, so scripts and tests can give the same feedback.
"""

from __future__ import annotations

import time
import uuid

import gradio as gr

from assistant.chat import Answer, Citation, PromptRecord
from assistant.feedback import FeedbackStore, completion
from assistant.runtime import GenerationParams
from assistant.ui_chat import ChatTab, chat_messages, record_answer, turn_messages
from assistant.ui_verify import VerifyTab
from assistant.verify import VERDICTS
from errors import UserError

PICK_PROMPT = "**You asked for another answer.** Which one is better? Your pick becomes a training pair."


def turn_of_message(turns: list[dict], message_index: int) -> int:
    """The number of the turn that the chatbot's message ``message_index`` belongs to."""
    first = 0
    for number, turn in enumerate(turns):
        first += len(turn_messages(turn, number))
        if message_index < first:
            return number
    raise gr.Error("That message is no longer in the conversation.")


def _user(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None) or None


def turn_completion(turn: dict) -> tuple[str, object]:
    """(the answer's key, the answer as the pairs store keeps it) of a finished turn."""
    if not turn.get("done") or turn.get("error") or not turn.get("prompt"):
        raise gr.Error("Only a finished answer can be judged.")
    return _keyed_completion(turn["prompt"], turn)


def earlier_completion(turn: dict) -> tuple[str, object]:
    """The same for the answer "try again" replaced last."""
    return _keyed_completion(turn["prompt"], turn["earlier"][-1])


def _keyed_completion(prompt: dict, answer: dict) -> tuple[str, object]:
    return answer["key"], completion(PromptRecord(**prompt), answer["reasoning"], answer["answer"],
                                     answer["thinking_done"], answer["model"], answer["adapter"])


class ChatFeedback:
    def __init__(self, chat: ChatTab, feedback: FeedbackStore | None, unavailable: str | None = None):
        self.chat, self.feedback, self.unavailable = chat, feedback, unavailable

    def _store(self) -> FeedbackStore:
        if self.feedback is None:
            raise gr.Error(f"Feedback cannot be saved: {self.unavailable}")
        return self.feedback

    def _turn(self, turns: list[dict], number: float | None) -> dict:
        if not turns:
            raise gr.Error("Ask something first.")
        number = len(turns) - 1 if number is None or number < 0 else int(number)
        if number >= len(turns):
            raise gr.Error(f"There is no turn {number} in this conversation.")
        return turns[number]

    def vote(self, turns: list[dict], number: float | None, good: bool, request: gr.Request) -> str:
        """A thumbs up (``good``) or down on turn ``number`` (-1: the last)."""
        key, answer = turn_completion(self._turn(turns, number))
        try:
            made = self._store().vote(key, answer, bool(good), _user(request))
        except UserError as e:
            raise gr.Error(str(e)) from None
        if made:
            return f"Saved: {len(made)} new training pair{'s' if len(made) != 1 else ''} from your votes."
        return ("Saved 👍." if good else
                "Saved 👎. It becomes a training pair when a better answer to this question arrives "
                "(try again, or write one).")

    def on_like(self, turns: list[dict], data: gr.LikeData, request: gr.Request) -> str:
        if data.liked not in (True, False):
            return ""  # a thumb taken back, or another kind of feedback
        return self.vote(turns, turn_of_message(turns, data.index if isinstance(data.index, int) else data.index[0]),
                         data.liked, request)

    def try_again(self, turns: list[dict], number: float | None, temperature: float, max_new_tokens: float,
                  request: gr.Request):
        """Another answer to turn ``number``'s exact prompt; the earlier one is kept for the pick."""
        turn = self._turn(turns, number)
        turn_completion(turn)  # a finished answer only
        previous = Answer(passages=[Citation(c["number"], c["source"], c["page"], c["text"])
                                    for c in sorted(turn["citations"] + turn["passages"], key=lambda c: c["number"])],
                          prompt=PromptRecord(**turn["prompt"]))
        keep = ("key", "reasoning", "answer", "thinking_done", "model", "adapter", "citations", "passages", "support")
        turn["earlier"] = [*turn.get("earlier", []), {k: turn[k] for k in keep}]
        turn.update(key=uuid.uuid4().hex, reasoning="", answer="", thinking_done=False, done=False, picked=None,
                    citations=[], passages=[], support=[], started_at=time.time(), seconds=None)
        params = GenerationParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature))
        stop = self.chat.switches.new(getattr(request, "session_hash", None) or "")
        yield chat_messages(turns), turns, gr.update(visible=False)
        try:
            for answer in self.chat.assistant.stream_again(previous, params, stop):
                record_answer(turn, answer, stop)
                yield chat_messages(turns), turns, gr.update(visible=False)
        except UserError as e:
            turn["error"] = str(e)
        turn["done"] = True
        yield chat_messages(turns), turns, gr.update(visible=not turn["error"])

    def on_retry(self, turns: list[dict], temperature: float, max_new_tokens: float, data: gr.RetryData,
                 request: gr.Request):
        index = data.index if isinstance(data.index, int) else data.index[0]
        yield from self.try_again(turns, turn_of_message(turns, index), temperature, max_new_tokens, request)

    def pick(self, turns: list[dict], number: float | None, better: str, request: gr.Request):
        """After "try again": ``better`` is "new" (the answer shown) or "earlier"."""
        turn = self._turn(turns, number)
        if not turn.get("earlier"):
            raise gr.Error("There is only one answer to this question: use “Try again” first.")
        if better not in ("new", "earlier"):
            raise gr.Error('Pick "new" or "earlier".')
        new, earlier = turn_completion(turn), earlier_completion(turn)
        chosen, rejected = (new, earlier) if better == "new" else (earlier, new)
        try:
            self._store().pick(chosen, rejected, _user(request))
        except UserError as e:
            raise gr.Error(str(e)) from None
        turn["picked"] = better
        return turns, "Saved: your pick is a training pair.", gr.update(visible=False)

    def pick_new(self, turns: list[dict], number: float | None, request: gr.Request):
        return self.pick(turns, number, "new", request)

    def pick_earlier(self, turns: list[dict], number: float | None, request: gr.Request):
        return self.pick(turns, number, "earlier", request)

    def edit(self, turns: list[dict], number: float | None, reasoning: str, answer: str, request: gr.Request) -> str:
        """The person's better reasoning and answer for turn ``number``, chosen over the model's."""
        try:
            self._store().edit(turn_completion(self._turn(turns, number)), reasoning or "", answer or "",
                               _user(request))
        except UserError as e:
            raise gr.Error(str(e)) from None
        return "Saved: your answer is a training pair, chosen over the model's."

    def fill_editor(self, turns: list[dict]):
        """The last answer's reasoning and answer, to edit."""
        turn = self._turn(turns, None)
        return turn["reasoning"], turn["answer"]

    def build(self, chatbot: gr.Chatbot, turns: gr.State, temperature: gr.Slider, max_new_tokens: gr.Slider
              ) -> None:
        status = gr.Markdown(elem_id="feedback-status")
        with gr.Row(visible=False, elem_id="pick-row") as pick_row:
            gr.Markdown(PICK_PROMPT)
            pick_new = gr.Button("This answer is better", elem_id="pick-new")
            pick_earlier = gr.Button("The earlier answer was better", elem_id="pick-earlier")
        with gr.Accordion("Write a better answer", open=False, elem_id="edit-answer"):
            gr.Markdown("Your reasoning and answer for the last question; saved as chosen over the model's.")
            fill = gr.Button("Start from the model's answer", size="sm", elem_id="edit-fill")
            edit_reasoning = gr.Textbox(label="Reasoning", lines=4, elem_id="edit-reasoning")
            edit_answer = gr.Textbox(label="Answer", lines=4, elem_id="edit-answer-text")
            save_edit = gr.Button("Save as the better answer", variant="primary", elem_id="edit-save")

        last = gr.Number(-1, visible=False)  # the turn the controls act on: the last
        model_events = dict(concurrency_limit=self.chat.assistant.settings.gpu_concurrency, concurrency_id="model")
        chatbot.like(self.on_like, [turns], status, api_visibility="private")
        chatbot.retry(self.on_retry, [turns, temperature, max_new_tokens], [chatbot, turns, pick_row],
                      api_visibility="private", **model_events)
        pick_new.click(self.pick_new, [turns, last], [turns, status, pick_row], api_visibility="private")
        pick_earlier.click(self.pick_earlier, [turns, last], [turns, status, pick_row], api_visibility="private")
        fill.click(self.fill_editor, turns, [edit_reasoning, edit_answer], api_visibility="private")
        save_edit.click(self.edit, [turns, last, edit_reasoning, edit_answer], status, api_visibility="private")

        # The same actions as named endpoints, for scripts: (turn number, ...) on the session's conversation.
        number, good, better = gr.Number(visible=False), gr.Checkbox(visible=False), gr.Textbox(visible=False)
        api = gr.Button(visible=False)
        api.click(self.vote, [turns, number, good], status, api_name="vote")
        api.click(self.try_again, [turns, number, temperature, max_new_tokens], [chatbot, turns, pick_row],
                  api_name="try_again", **model_events)
        api.click(self.pick, [turns, number, better], [turns, status, pick_row], api_name="pick")
        api.click(self.edit, [turns, number, edit_reasoning, edit_answer], status, api_name="edit_answer")


class VerdictCorrection:
    """Under the verify tab: "the verdict is wrong, it should be …" leaves a pair for the judge's prompt."""

    def __init__(self, verify: VerifyTab, feedback: FeedbackStore | None, unavailable: str | None = None):
        self.verify, self.feedback, self.unavailable = verify, feedback, unavailable

    def correct(self, verdict: str, request: gr.Request) -> str:
        if self.feedback is None:
            raise gr.Error(f"Feedback cannot be saved: {self.unavailable}")
        finished = self.verify.finished.get(getattr(request, "session_hash", None) or "")
        if finished is None:
            raise gr.Error("Verify a claim first; then correct its verdict.")
        try:
            self.feedback.correct_verdict(*finished, verdict, _user(request))
        except UserError as e:
            raise gr.Error(str(e)) from None
        return f"Saved: “{verdict}” is a training pair for the judge, chosen over “{finished[1].verdict}”."

    def build(self) -> None:
        with gr.Accordion("Is the verdict wrong?", open=False, elem_id="verdict-correction"):
            with gr.Row():
                right = gr.Radio(list(VERDICTS), label="The right verdict", elem_id="right-verdict")
                save = gr.Button("Save the right verdict", elem_id="save-verdict")
            status = gr.Markdown(elem_id="verdict-correction-status")
        save.click(self.correct, right, status, api_name="correct_verdict")
