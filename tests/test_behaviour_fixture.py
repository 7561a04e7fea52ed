"""Greedy outputs of ``generate`` are unchanged: prompts x all four variants x raw/template, recorded with
``tests/fixtures/make_greedy_fixture.py`` (through ``safeinfer generate --json``) before the decode core was
rewritten, and compared field by field here through the library the CLI calls."""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "greedy_generate.json").read_text())


def test_greedy_generate_matches_recorded_fixture(si):
    si = si.with_(gate="off")  # the fixture predates the harm gate: --gate off must reproduce it exactly
    diffs = []
    for row in FIXTURE["rows"]:
        r = si.generate(row["prompt"], variant=row["variant"], raw=row["raw"], max_tokens=FIXTURE["max_tokens"],
                        temperature=0).to_dict()
        got = {k: r[k] for k in ("response", "variant", "n_tokens", "stop_reason", "guided_tokens")}
        want = {k: row[k] for k in got}
        if got != want:
            diffs.append((row["prompt"][:30], row["variant"], row["raw"], want, got))
    assert not diffs, diffs[:3]
    assert len(FIXTURE["rows"]) == 48
