"""The terminal chat session behind ``safeinfer chat``: history, slash commands and streaming replies.

The session is a small object (testable without a terminal); the CLI only feeds it lines and prints."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..api import SafeInfer
from ..core.settings import VARIANTS
from ..errors import UsageError

HELP = """commands:
  /help              this help
  /variant NAME      base | sa | sgds | safeinfer
  /gamma G           safety-vector strength
  /lambda L          guidance strength λ in [0, 1)
  /reset             forget the conversation
  /stats             settings and the last reply's figures
  /quit              leave (Ctrl-D too); Ctrl-C stops a reply and keeps the session"""


@dataclass
class ReplyStats:
    tokens: int = 0
    guided: int = 0
    seconds: float = 0.0
    stopped: bool = False
    gate_score: float | None = None
    flagged: bool | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ChatSession:
    si: SafeInfer
    variant: str
    system: str | None = None
    gen: dict = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    last: ReplyStats = field(default_factory=ReplyStats)

    def __post_init__(self) -> None:
        self.si = self.si.with_(variant=self.variant)

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def command(self, line: str) -> tuple[str, bool]:
        """Run a slash command; returns (text to show, keep going)."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            if name in ("/quit", "/exit"):
                return "", False
            if name == "/help":
                return HELP, True
            if name == "/reset":
                self.history.clear()
                return "conversation cleared", True
            if name == "/variant":
                if arg not in VARIANTS:
                    return f"variants: {', '.join(VARIANTS)}", True
                self.si = self.si.with_(variant=arg)
                self.variant = arg
                return f"variant {arg}", True
            if name == "/gamma":
                if self.si.steering is None:
                    return "no safety vector loaded", True
                self.si = self.si.with_(gamma=float(arg))
                return f"gamma {self.si.steering.gamma:g}", True
            if name == "/lambda":
                self.si = self.si.with_(lam=float(arg))
                return f"lambda {self.si.lam:g}", True
            if name == "/stats":
                return self.stats(), True
        except (ValueError, UsageError) as e:
            return f"error: {e}", True
        return f"unknown command {name} (try /help)", True

    def stats(self) -> str:
        st = self.si.steering
        sa = f"gamma {st.gamma:g}, layers {list(st.layers)}, positions {st.positions}" if st else "no vector"
        r = self.last
        return (f"variant {self.variant}; {sa}; guidance {self.si.guidance}, lambda {self.si.lam:g}; "
                f"turns {len(self.history) // 2}; last reply {r.tokens} tokens, {r.tokens_per_s:.1f} tok/s, "
                f"{r.guided} changed by guidance; gate "
                + ("not used" if r.gate_score is None else f"score {r.gate_score:+.3f}, "
                   + ("flagged: " + ("refused" if self.si.settings.on_flag == "refuse" else "steered")
                      if r.flagged else "judged benign: decoded plainly")))

    def reply(self, user: str, on_text: Callable[[str], None]) -> ReplyStats:
        """Stream a reply to ``user``; KeyboardInterrupt stops it and keeps what was said so far."""
        self.history.append({"role": "user", "content": user})
        stats = ReplyStats()
        parts: list[str] = []
        t0 = time.perf_counter()
        stream: Iterator = self.si.events(self.messages(), variant=self.variant, **self.gen)
        try:
            for step, res in stream:
                if res is not None:
                    stats.gate_score, stats.flagged = res.gate_score, res.flagged
                parts.append(step.text)
                on_text(step.text)
                if not step.eog and step.token >= 0:
                    stats.tokens += 1
                    stats.guided += step.guided
        except KeyboardInterrupt:
            stats.stopped = True
        except UsageError:
            self.history.pop()
            raise
        stats.seconds = time.perf_counter() - t0
        self.history.append({"role": "assistant", "content": "".join(parts).strip()})
        self.last = stats
        return stats
