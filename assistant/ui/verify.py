"""The verification tab: a claim, then evidence, the case for and against side by side, and the verdict."""

from __future__ import annotations

import html
import uuid
from collections import OrderedDict

import gradio as gr

from assistant.chat import Assistant, Citation
from assistant.model_loader import ModelLoader, with_hint
from assistant.quotes import QuoteCheck
from assistant.ui.markdown import passage_markdown
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
    return "\n\n".join(f"<details><summary>{html.escape(c.label)}</summary>\n\n{passage_markdown(c.text)}\n\n</details>"
                       for c in citations)


WORDS_MARKS = {"exact": "found word for word", "altered": "found with differences",
               "not found": "not found in any document"}
WORDS_HEADINGS = {"altered": "The quoted words differ from the document's",
                  "not found": "The quoted words are in no document"}
DIFF_KEY = ("<mark>Marked</mark>: the located words; <del>struck</del>: in the quote, not the document; "
            "<ins>underlined</ins>: in the document, not the quote.")


def highlighted_passage(check: QuoteCheck) -> str:
    """The located passage as HTML: the words marked, each difference struck (quote) or underlined (document)."""
    m = check.match
    text, out, at = m.passage, [html.escape(m.passage[:m.start])], m.start
    for d in sorted(m.differences, key=lambda d: (d.start, d.end)):
        if d.start > at:
            out.append(f"<mark>{html.escape(text[at:d.start])}</mark>")
            at = d.start
        if d.quoted:
            out.append(f"<del>{html.escape(d.quoted)}</del>")
        if d.end > d.start:
            out.append(f"<ins>{html.escape(text[d.start:d.end])}</ins>")
            at = d.end
    if m.end > at:
        out.append(f"<mark>{html.escape(text[at:m.end])}</mark>")
    out.append(html.escape(text[m.end:]))
    return "".join(out).replace("\n", "<br>")


def quote_markdown(result: Verification) -> str:
    """The quote block: the words' look-up, the attribution once judged, and the passage with the words marked."""
    check = result.quote
    if check is None:
        return ""
    speaker = html.escape(check.quote.speaker) if check.quote.speaker else "no speaker named"
    lines = ["### Quote", f"“{html.escape(check.quote.text)}” ({speaker})",
             f"**Words:** {WORDS_MARKS[check.words]}"]
    if result.stage == "done":
        lines.append(f"**Attribution:** {check.attribution}")
    if check.match is not None:
        m = check.match
        where = html.escape(m.source.rsplit("/", 1)[-1]) + (f", page {m.page}" if m.page is not None else "")
        lines += [f"**Where:** {where} (evidence [1])", f"<blockquote>{highlighted_passage(check)}</blockquote>"]
        if m.differences:
            lines.append(DIFF_KEY)
    return "\n\n".join(lines)


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
    verdict = VERDICT_MARKS.get(result.verdict, result.verdict)
    words = result.quote.words if result.quote is not None else None
    # A quote's words, checked against the documents letter by letter, lead: the judge's verdict may only say
    # that the evidence is thin, while the look-up already shows the quote is not what the document says.
    lines = [f"## {WORDS_HEADINGS[words]}", f"### {verdict}"] if words in WORDS_HEADINGS else [f"## {verdict}"]
    lines.append(f"**Confidence:** {result.confidence:.2f}")
    if result.quote is not None:
        lines.append(f"**Quoted words:** {WORDS_MARKS[result.quote.words]} · "
                     f"**Attribution:** {result.quote.attribution}")
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
        """Stream (stage, quote, evidence, case for, case against, verdict, result JSON) as the debate grows."""
        claim = (claim or "").strip()
        if not claim:
            yield "*Type a claim (or a quote attributed to someone) to check.*", "", "", "", "", "", None
            return
        yield f"*{STAGES['evidence']}*", "", "", "", "", "", None
        if self.loader.wait() is None:
            yield f"**Cannot verify:**\n\n```\n{self.loader.error}\n```", "", "", "", "", "", None
            return
        try:
            for result in stream_verification(self.assistant, claim, self.assistant.default_params()):
                if result.stage == "done":
                    self._keep(getattr(request, "session_hash", None) or "", result)
                yield (f"*{STAGES[result.stage]}*", quote_markdown(result),
                       passages_markdown(result.evidence, "*No passages in the store bear on this claim.*"),
                       case_markdown(result.case_for, "for", result.stage),
                       case_markdown(result.case_against, "against", result.stage),
                       verdict_markdown(result), result.to_dict() if result.stage == "done" else None)
        except ModelUnavailable as e:
            yield f"**Cannot verify:**\n\n```\n{with_hint(str(e))}\n```", "", "", "", "", "", None
        except (StoreError, EmbeddingModelError) as e:
            yield f"**Cannot search the knowledge store:** {e}", "", "", "", "", "", None
        except UserError as e:
            yield f"**Cannot verify:** {e}", "", "", "", "", "", None

    def build(self, settings) -> None:
        gr.Markdown("Check a claim, or a quote attributed to someone, against your documents: the model argues "
                    "for and against it from the same evidence, then a judge weighs both.")
        with gr.Row():
            claim = gr.Textbox(label="Claim", placeholder="e.g. The report says revenue doubled in 2023.",
                               scale=6, elem_id="claim")
            verify = gr.Button("Verify", variant="primary", scale=1, elem_id="verify")
        stage = gr.Markdown(elem_id="verify-stage")
        quote = gr.Markdown(elem_id="quote")
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
              [stage, quote, evidence, case_for, case_against, verdict, result_json], api_name="verify",
              concurrency_limit=settings.gpu_concurrency, concurrency_id="model")
