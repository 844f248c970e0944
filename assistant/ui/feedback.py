"""Feedback in the chat: thumbs up or down, "try again" and pick the better answer, or write a better one.

Each becomes preference data in the pairs store through ``assistant.feedback``. Every action works on a turn
of the session's conversation (the chat tab's ``turns`` state) and is reachable two ways: from the chatbot's own
buttons (like, retry) and the controls below it, and as named API endpoints (``/vote``, ``/try_again``,
``/pick``, ``/edit_answer``) that take the turn's number, so scripts and tests can give the same feedback.
"""

from __future__ import annotations

import gradio as gr

from assistant.chat import Answer, Citation, PromptRecord
from assistant.feedback import FeedbackStore, Saved, completion
from assistant.turns import ChatTurn, EarlierAnswer
from assistant.ui.chat import (
    EARLIER_NO_ANSWER,
    ChatTab,
    chat_messages,
    request_session,
    request_user,
    throttled,
    turn_messages,
)
from assistant.ui.errors import Refusal
from assistant.ui.verify import VerifyTab
from assistant.verify import VERDICTS
from engine.runtime import GenerationParams
from errors import UserError
from finetune.pairs_store import Change

COMPARE_PROMPT = ("**You asked for another answer.** Which one is better? Read both, reasoning and answer; your "
                  "pick becomes a training pair.")
NO_EDIT_TARGET = "*Ask a question first: the editor is for the last answer.*"


def turn_of_message(turns: list[ChatTurn], message_index: int) -> int:
    """The number of the turn that the chatbot's message ``message_index`` belongs to."""
    first = 0
    for number, turn in enumerate(turns):
        first += len(turn_messages(turn, number))
        if message_index < first:
            return number
    raise Refusal("That message is no longer in the conversation.")




def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return f"“{text if len(text) <= limit else text[:limit - 1] + '…'}”"


def turn_completion(turn: ChatTurn) -> tuple[str, object]:
    """(the answer's key, the answer as the pairs store keeps it) of a finished turn."""
    if not turn.done or turn.error or not turn.prompt:
        raise Refusal("Only a finished answer can be judged.")
    return _keyed_completion(turn.prompt, turn)


def earlier_completion(turn: ChatTurn) -> tuple[str, object]:
    """The same for the answer "try again" replaced last."""
    return _keyed_completion(turn.prompt, turn.earlier[-1])


def _keyed_completion(prompt: dict, answer: ChatTurn | EarlierAnswer) -> tuple[str, object]:
    return answer.key, completion(PromptRecord(**prompt), answer.reasoning, answer.answer, answer.thinking_done,
                                  answer.model, answer.adapter)


def answer_turn(turns: list[ChatTurn], key: str | None) -> ChatTurn | None:
    """The turn whose answer (the one shown, not an earlier one) is ``key``."""
    return next((turn for turn in turns if key and turn.key == key), None)


def replaced_note(change: Change) -> str:
    count = len(change.replaced_pairs)
    if not count:
        return ""
    return (f" It replaces the earlier pair{'s' if count != 1 else ''} that said the opposite "
            f"({count} removed).")


def answer_markdown(title: str, answer: ChatTurn | EarlierAnswer) -> str:
    """One side of the comparison: its reasoning (quoted) and its answer."""
    reasoning = answer.reasoning.strip() or "(no reasoning)"
    quoted = "\n".join(f"> {line}" for line in reasoning.splitlines())
    body = answer.answer.strip() or EARLIER_NO_ANSWER
    return f"### {title}\n**Reasoning**\n\n{quoted}\n\n**Answer**\n\n{body}"


class ChatFeedback:
    """The feedback controls under the chat. Each action is bound to the answer it was made on, by the answer's
    key: the editor remembers which answer it was opened for, the comparison which two answers it shows, and an
    action whose answer is no longer on the page is refused rather than applied to whatever is there now."""

    def __init__(self, chat: ChatTab, feedback: FeedbackStore | None, unavailable: str | None = None):
        self.chat, self.feedback, self.unavailable = chat, feedback, unavailable

    def _store(self) -> FeedbackStore:
        if self.feedback is None:
            raise Refusal(f"Feedback cannot be saved: {self.unavailable}")
        return self.feedback

    def _turn(self, turns: list[ChatTurn], number: float | None) -> ChatTurn:
        if not turns:
            raise Refusal("Ask something first.")
        number = len(turns) - 1 if number is None or number < 0 else int(number)
        if number >= len(turns):
            raise Refusal(f"There is no turn {number} in this conversation.")
        return turns[number]

    def _save(self, request: gr.Request | None, what: str, key: str, write) -> Change:
        """Run one write on the store and remember it for undo; a user's mistake becomes a message."""
        try:
            change = write(self._store())
        except UserError as e:
            raise Refusal(str(e)) from None
        if change.made or change.vote is not None or change.replaced_pairs:
            self._store().remember(request_session(request), Saved(what, change, key))
        return change

    # -- votes ----------------------------------------------------------------------------------------

    def vote(self, turns: list[ChatTurn], number: float | None, good: bool, request: gr.Request) -> str:
        """A thumbs up (``good``) or down on turn ``number`` (-1: the last)."""
        return self._vote(self._turn(turns, number), bool(good), request)[0]

    def _vote(self, turn: ChatTurn, good: bool, request: gr.Request | None) -> tuple[str, Change]:
        key, answer = turn_completion(turn)
        thumb = "👍" if good else "👎"
        change = self._save(request, f"your {thumb} on the answer to {_short(turn.question)}", key,
                            lambda store: store.vote(key, answer, good, request_user(request)))
        changed = [v for v in change.replaced_votes if v.good != good]
        note = f" Your earlier {'👎' if good else '👍'} on this answer is replaced." if changed else ""
        if change.made:
            count = len(change.made)
            return (f"Saved {thumb}: {count} new training pair{'s' if count != 1 else ''} from your votes."
                    + note + replaced_note(change)), change
        if good:
            return f"Saved {thumb}.{note}{replaced_note(change)}", change
        return (f"Saved {thumb}.{note}{replaced_note(change)} It becomes a training pair when a better answer to "
                "this question arrives (try again, or write one)."), change

    def on_like(self, turns: list[ChatTurn], compare: dict | None, data: gr.LikeData, request: gr.Request):
        """A thumb on the chatbot: (status, comparison row, comparison). Taking a thumb back undoes that vote."""
        turn = turns[turn_of_message(turns, data.index if isinstance(data.index, int) else data.index[0])]
        if data.liked not in (True, False):
            last = self._store().last(request_session(request))
            if last is None or last.key != turn.key or last.change.vote is None:
                return "Thumb taken back on the page; use “Undo last feedback” to take back an earlier vote.", \
                    gr.update(), compare
            return self.undo(request), gr.update(), compare
        status, change = self._vote(turn, data.liked, request)
        if compare and change.made and compare.get("new") == turn.key:
            return status, gr.update(visible=False), None  # the vote paired the two answers compared: done
        return status, gr.update(), compare

    def undo(self, request: gr.Request) -> str:
        try:
            return f"Undone: {self._store().undo(request_session(request))}."
        except UserError as e:
            raise Refusal(str(e)) from None

    # -- try again and the comparison -----------------------------------------------------------------

    def try_again(self, turns: list[ChatTurn], number: float | None, temperature: float, max_new_tokens: float,
                  request: gr.Request):
        """Another answer to turn ``number``'s exact prompt; the earlier one is kept for the comparison.

        Yields (chatbot, turns, comparison row, comparison, earlier side, new side)."""
        turn = self._turn(turns, number)
        turn_completion(turn)  # a finished answer only
        previous = Answer(passages=[Citation(c["number"], c["source"], c["page"], c["text"])
                                    for c in sorted(turn.citations + turn.passages, key=lambda c: c["number"])],
                          prompt=PromptRecord(**turn.prompt), left_out=turn.left_out,
                          translations=tuple(turn.translations))
        turn.replace_answer()
        params = GenerationParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature))
        stop = self.chat.switches.new(request_session(request))
        hidden = (gr.update(visible=False), None, gr.update(), gr.update())
        yield chat_messages(turns), turns, *hidden
        try:
            for answer in throttled(self.chat.assistant.stream_again(previous, params, stop)):
                turn.record(answer, stop.is_set())
                yield chat_messages(turns), turns, *hidden
        except UserError as e:
            turn.error = str(e)
        turn.done = True
        if turn.error:
            yield chat_messages(turns), turns, *hidden
            return
        compare = {"new": turn.key, "earlier": turn.earlier[-1].key}
        yield (chat_messages(turns), turns, gr.update(visible=True), compare,
               answer_markdown(f"Earlier answer {len(turn.earlier)}", turn.earlier[-1]),
               answer_markdown("New answer", turn))

    def on_retry(self, turns: list[ChatTurn], temperature: float, max_new_tokens: float, data: gr.RetryData,
                 request: gr.Request):
        index = data.index if isinstance(data.index, int) else data.index[0]
        yield from self.try_again(turns, turn_of_message(turns, index), temperature, max_new_tokens, request)

    def pick(self, turns: list[ChatTurn], number: float | None, better: str, request: gr.Request) -> str:
        """After "try again": ``better`` is "new" (the answer shown) or "earlier"."""
        return self._pick(self._turn(turns, number), better, request)

    def _pick(self, turn: ChatTurn, better: str, request: gr.Request | None) -> str:
        if not turn.earlier:
            raise Refusal("There is only one answer to this question: use “Try again” first.")
        if better not in ("new", "earlier"):
            raise Refusal('Pick "new" or "earlier".')
        new, earlier = turn_completion(turn), earlier_completion(turn)
        chosen, rejected = (new, earlier) if better == "new" else (earlier, new)
        change = self._save(request, f"your pick of the {better} answer to {_short(turn.question)}", new[0],
                            lambda store: store.pick(chosen, rejected, request_user(request)))
        turn.picked = better
        if not change.made:
            return "Already saved: this pick is in the pairs store."
        return "Saved: your pick is a training pair." + replaced_note(change)

    def pick_compared(self, turns: list[ChatTurn], compare: dict | None, better: str, request: gr.Request):
        """A pick from the comparison row: on the two answers it shows, or refused when they have changed."""
        turn = answer_turn(turns, (compare or {}).get("new"))
        if turn is None or not turn.earlier or turn.earlier[-1].key != compare["earlier"]:
            raise Refusal("These two answers are no longer the last comparison in the conversation; nothing "
                           "was saved. Use “Try again” on the answer you want to compare.")
        return turns, self._pick(turn, better, request), gr.update(visible=False), None

    def pick_new_compared(self, turns: list[ChatTurn], compare: dict | None, request: gr.Request):
        return self.pick_compared(turns, compare, "new", request)

    def pick_earlier_compared(self, turns: list[ChatTurn], compare: dict | None, request: gr.Request):
        return self.pick_compared(turns, compare, "earlier", request)

    # -- the editor -----------------------------------------------------------------------------------

    def edit(self, turns: list[ChatTurn], number: float | None, reasoning: str, answer: str, request: gr.Request) -> str:
        """The person's better reasoning and answer for turn ``number``, chosen over the model's."""
        return self._edit(self._turn(turns, number), reasoning, answer, request)

    def _edit(self, turn: ChatTurn, reasoning: str, answer: str, request: gr.Request | None) -> str:
        original = turn_completion(turn)
        change = self._save(request, f"your written answer to {_short(turn.question)}", original[0],
                            lambda store: store.edit(original, reasoning or "", answer or "", request_user(request)))
        if not change.made:
            return "Already saved: this answer of yours is in the pairs store."
        return "Saved: your answer is a training pair, chosen over the model's." + replaced_note(change)

    def save_edit(self, turns: list[ChatTurn], edit_for: str | None, reasoning: str, answer: str, request: gr.Request
                  ) -> str:
        """The editor's text, for the answer it was opened for: never for another one."""
        turn = answer_turn(turns, edit_for)
        if turn is None:
            raise Refusal("The answer this editor was for is no longer in the conversation; nothing was saved. "
                           "Ask again, then write your answer.")
        return self._edit(turn, reasoning, answer, request)

    def editor_for_last(self, turns: list[ChatTurn]):
        """The editor emptied and bound to the last finished answer: (reasoning, answer, bound key, heading)."""
        turn = turns[-1] if turns else None
        if turn is None or not turn.done or turn.error:
            return "", "", None, NO_EDIT_TARGET
        return "", "", turn.key, f"Your reasoning and answer to {_short(turn.question, 120)}, saved as " \
                                    "chosen over the model's."

    def fill_editor(self, turns: list[ChatTurn], edit_for: str | None):
        """The bound answer's reasoning and answer, to edit."""
        turn = answer_turn(turns, edit_for)
        if turn is None:
            raise Refusal("Ask a question first: the editor starts from the last answer.")
        return turn.reasoning, turn.answer

    def build(self, chatbot: gr.Chatbot, turns: gr.State, temperature: gr.Slider, max_new_tokens: gr.Slider
              ) -> None:
        with gr.Row():
            status = gr.Markdown(elem_id="feedback-status")
            undo = gr.Button("Undo last feedback", size="sm", scale=0, min_width=180, elem_id="feedback-undo")
        compare = gr.State(None)  # {"new": key, "earlier": key} of the two answers the row shows
        with gr.Column(visible=False, elem_id="pick-row") as compare_row:
            gr.Markdown(COMPARE_PROMPT)
            with gr.Row(equal_height=True):
                with gr.Column(elem_id="compare-earlier"):
                    earlier_side = gr.Markdown()
                    pick_earlier = gr.Button("The earlier answer is better", elem_id="pick-earlier")
                with gr.Column(elem_id="compare-new"):
                    new_side = gr.Markdown()
                    pick_new = gr.Button("The new answer is better", elem_id="pick-new")
        edit_for = gr.State(None)  # the key of the answer the editor is for
        with gr.Accordion("Write a better answer", open=False, elem_id="edit-answer"):
            edit_heading = gr.Markdown(NO_EDIT_TARGET, elem_id="edit-for")
            fill = gr.Button("Start from the model's answer", size="sm", elem_id="edit-fill")
            edit_reasoning = gr.Textbox(label="Reasoning", lines=4, elem_id="edit-reasoning")
            edit_answer = gr.Textbox(label="Answer", lines=4, elem_id="edit-answer-text")
            save_edit = gr.Button("Save as the better answer", variant="primary", elem_id="edit-save")

        editor = [edit_reasoning, edit_answer, edit_for, edit_heading]
        compared = [compare_row, compare, earlier_side, new_side]
        model_events = dict(concurrency_limit=self.chat.assistant.settings.gpu_concurrency, concurrency_id="model")
        chatbot.like(self.on_like, [turns, compare], [status, compare_row, compare], api_visibility="private")
        chatbot.retry(self.on_retry, [turns, temperature, max_new_tokens], [chatbot, turns, *compared],
                      api_visibility="private", **model_events).then(
            self.editor_for_last, turns, editor, api_visibility="private", queue=False).then(
            self.chat.keep, [turns, self.chat.conversation], None, api_visibility="private", queue=False)
        for button, pick in ((pick_new, self.pick_new_compared), (pick_earlier, self.pick_earlier_compared)):
            button.click(pick, [turns, compare], [turns, status, compare_row, compare], api_visibility="private")
        undo.click(self.undo, None, status, api_name="undo_feedback")
        fill.click(self.fill_editor, [turns, edit_for], [edit_reasoning, edit_answer], api_visibility="private")
        save_edit.click(self.save_edit, [turns, edit_for, edit_reasoning, edit_answer], status,
                        api_visibility="private")
        # Each new answer, and "New chat", starts the editor afresh and closes a comparison left open.
        self.chat.answered.then(self.editor_for_last, turns, editor, api_visibility="private", queue=False)
        for cleared in self.chat.cleared:
            cleared.then(lambda: (gr.update(visible=False), None, "", "", "", "", None, NO_EDIT_TARGET), None,
                         [*compared, *editor], api_visibility="private", queue=False)

        # The same actions as named endpoints, for scripts: (turn number, ...) on the session's conversation.
        number, good, better = gr.Number(visible=False), gr.Checkbox(visible=False), gr.Textbox(visible=False)
        api = gr.Button(visible=False)
        api.click(self.vote, [turns, number, good], status, api_name="vote")
        api.click(self.try_again, [turns, number, temperature, max_new_tokens], [chatbot, turns, *compared],
                  api_name="try_again", **model_events)
        api.click(self.pick, [turns, number, better], status, api_name="pick")
        api.click(self.edit, [turns, number, edit_reasoning, edit_answer], status, api_name="edit_answer")


class VerdictCorrection:
    """Under the verify tab: "the verdict is wrong, it should be …" leaves a pair for the judge's prompt."""

    def __init__(self, verify: VerifyTab, feedback: FeedbackStore | None, unavailable: str | None = None):
        self.verify, self.feedback, self.unavailable = verify, feedback, unavailable

    def correct(self, verdict: str, request: gr.Request) -> str:
        if self.feedback is None:
            raise Refusal(f"Feedback cannot be saved: {self.unavailable}")
        finished = self.verify.finished.get(request_session(request))
        if finished is None:
            raise Refusal("Verify a claim first; then correct its verdict.")
        try:
            change = self.feedback.correct_verdict(*finished, verdict, request_user(request))
        except UserError as e:
            raise Refusal(str(e)) from None
        if change.made:
            self.feedback.remember(request_session(request), Saved(f"your corrected verdict “{verdict}”", change,
                                                            finished[0]))
        return f"Saved: “{verdict}” is a training pair for the judge, chosen over “{finished[1].verdict}”."

    def build(self) -> None:
        with gr.Accordion("Is the verdict wrong?", open=False, elem_id="verdict-correction"):
            with gr.Row():
                right = gr.Radio(list(VERDICTS), label="The right verdict", elem_id="right-verdict")
                save = gr.Button("Save the right verdict", elem_id="save-verdict")
            status = gr.Markdown(elem_id="verdict-correction-status")
        save.click(self.correct, right, status, api_name="correct_verdict")
