"""How a prompt is put in front of the model (``--frame``), one meaning everywhere:

- ``template``: the model's chat template (or ``--chat-format``), the default;
- ``none``: no template, BOS + the prompt's own tokens (what ``--raw`` means in every command);
- ``qa``: no template, the prompt in the paper's plain ``Q: ...\\nA:`` frame, and a reply ends where the model
  starts the next question (for base models, which never answer a bare question).
"""

from __future__ import annotations

from ..errors import SettingError
from .demos import qa_prompt
from .settings import check_choice

FRAMES = ("template", "none", "qa")
DEFAULT_FRAME = "template"

QA_STOP = ("\nQ:",)
"""Where a reply in the plain ``Q: ...\\nA:`` frame ends: the model starting the next question."""


def check_frame(frame: str) -> str:
    return check_choice("frame", frame, FRAMES)


def resolve_frame(raw: bool = False, frame: str | None = None) -> str:
    """``--raw`` is ``--frame none``; asking for both with another frame is a contradiction."""
    if frame is not None:
        check_frame(frame)
        if raw and frame != "none":
            raise SettingError(f"--raw means --frame none; it contradicts --frame {frame}")
        return frame
    return "none" if raw else DEFAULT_FRAME


def frame_prompt(text: str, frame: str) -> str:
    """The prompt text as the model sees it before tokenization (the template is applied later)."""
    return qa_prompt(text) if frame == "qa" else text


def frame_cont(text: str, frame: str) -> str:
    """A continuation to score after a framed prompt: after ``A:`` it starts with a space."""
    return " " + text if frame == "qa" and text[:1] not in (" ", "\n") else text


def frame_stops(frame: str) -> tuple[str, ...]:
    return QA_STOP if frame == "qa" else ()
