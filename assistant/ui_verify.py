"""The verification tab: a claim, then evidence, the case for and against side by side, and the verdict."""

from __future__ import annotations

import html
import uuid
from collections import OrderedDict

import gradio as gr

from assistant.chat import Assistant, Citation
from assistant.ui_model import ModelLoader, with_hint
from assistant.verify import Verification, stream_verification
from errors import ModelUnavailable, UserError
from knowledge import StoreError
from knowledge.embeddings import EmbeddingModelError

STAGES = {"evidence": "Retrieving evidence…", "for": "Arguing the case for…",
          "against": "Arguing the case against…", "judge": "The judge is weighing both cases…", "done": "Done."}
VERDICT_MARKS = {"supported": "Verdict: supported", "refuted": "Verdict: refuted",
                 "not enough evidence": "Verdict: not enough evidence"}


def passages_markdown(citations: list[Citation], empty: str) -> str:
    """Each passage as a closed block: its label (source, page) opens the text."""
    if not citations:
        return empty
    return "\n\n".join(f"<details><summary>{html.escape(c.label)}</summary>\n\n{html.escape(c.text)}\n\n</details>"
                       for c in citations)


ORDER = list(STAGES)
NO_CASE = ("*No case: the model wrote only reasoning, with no answer after it, within the token limit "
           "(MAX_NEW_TOKENS).*")


def case_markdown(text: str, side: str, stage: str) -> str:
    """The case as written so far; a plain note when the model finished this side without writing one."""
    if text:
        return text
    if stage == side:
        return "*…*"
    return NO_CASE if ORDER.index(stage) > ORDER.index(side) else ""


def verdict_markdown(result: Verification) -> str:
    if result.stage != "done":
        return f"*{STAGES[result.stage]}*"
    lines = [f"## {VERDICT_MARKS.get(result.verdict, result.verdict)}",
             f"**Confidence:** {result.confidence:.2f}"]
    if result.reason:
        lines.append(f"**Reason:** {html.escape(result.reason)}")
    lines.append("**Citations:**\n\n" + passages_markdown(result.citations, "none"))
    return "\n\n".join(lines)


class VerifyTab:
    KEPT_RESULTS = 256  # the last finished verification of this many sessions, for a verdict correction

    def __init__(self, assistant: Assistant, loader: ModelLoader):
        self.assistant, self.loader = assistant, loader
        self.finished: OrderedDict[str, tuple[str, Verification]] = OrderedDict()  # session -> (key, result)

    def _keep(self, session: str, result: Verification) -> None:
        self.finished[session] = (uuid.uuid4().hex, result)
        self.finished.move_to_end(session)
        while len(self.finished) > self.KEPT_RESULTS:
            self.finished.popitem(last=False)

    def run(self, claim: str, request: gr.Request = None):
        """Stream (stage, evidence, case for, case against, verdict, result JSON) as the debate grows."""
        claim = (claim or "").strip()
        if not claim:
            yield "*Type a claim (or a quote attributed to someone) to check.*", "", "", "", "", None
            return
        yield f"*{STAGES['evidence']}*", "", "", "", "", None
        if self.loader.wait() is None:
            yield f"**Cannot verify:**\n\n```\n{self.loader.error}\n```", "", "", "", "", None
            return
        try:
            for result in stream_verification(self.assistant, claim, self.assistant.default_params()):
                if result.stage == "done":
                    self._keep(getattr(request, "session_hash", None) or "", result)
                yield (f"*{STAGES[result.stage]}*",
                       passages_markdown(result.evidence, "*No passages in the store bear on this claim.*"),
                       case_markdown(result.case_for, "for", result.stage),
                       case_markdown(result.case_against, "against", result.stage),
                       verdict_markdown(result), result.to_dict() if result.stage == "done" else None)
        except ModelUnavailable as e:
            yield f"**Cannot verify:**\n\n```\n{with_hint(str(e))}\n```", "", "", "", "", None
        except (StoreError, EmbeddingModelError) as e:
            yield f"**Cannot search the knowledge store:** {e}", "", "", "", "", None
        except UserError as e:
            yield f"**Cannot verify:** {e}", "", "", "", "", None

    def build(self, settings) -> None:
        gr.Markdown("Check a claim, or a quote attributed to someone, against your documents: the model argues "
                    "for and against it from the same evidence, then a judge weighs both.")
        with gr.Row():
            claim = gr.Textbox(label="Claim", placeholder="e.g. The report says revenue doubled in 2023.",
                               scale=6, elem_id="claim")
            verify = gr.Button("Verify", variant="primary", scale=1, elem_id="verify")
        stage = gr.Markdown(elem_id="verify-stage")
        with gr.Accordion("Evidence", open=True):
            evidence = gr.Markdown(elem_id="evidence")
        with gr.Row(equal_height=True):
            with gr.Column():
                gr.Markdown("### Case for")
                case_for = gr.Markdown(elem_id="case-for", container=True)
            with gr.Column():
                gr.Markdown("### Case against")
                case_against = gr.Markdown(elem_id="case-against", container=True)
        verdict = gr.Markdown(elem_id="verdict", container=True)
        with gr.Accordion("Result as JSON", open=False):
            result_json = gr.JSON(label="verification")
        gr.on([claim.submit, verify.click], self.run, claim,
              [stage, evidence, case_for, case_against, verdict, result_json], api_name="verify",
              concurrency_limit=settings.gpu_concurrency, concurrency_id="model")
