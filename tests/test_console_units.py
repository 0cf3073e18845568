"""The console's pure pieces: the dashboard chart's layout, where a login may send the browser, and times."""

from __future__ import annotations

from hl7bridge.api.console.pages import _safe_next, chart
from hl7bridge.api.console.templating import age, when


def test_the_chart_stacks_each_minutes_codes_in_proportion_and_counts_enhanced_codes_with_their_kin() -> None:
    drawn = chart([(0.0, {}), (60.0, {"AA": 30, "CA": 10, "AE": 20}), (120.0, {"AR": 5, "": 5})], width=300, height=100)
    assert drawn.peak == 60 and drawn.total == 70
    first = [b for b in drawn.bars if b.x < 100]
    assert first == [], "an empty minute draws nothing"
    second = {b.kind: b for b in drawn.bars if 100 <= b.x < 200}
    assert second["AA"].height == round(40 * 98 / 60, 1) and second["AE"].height == round(20 * 98 / 60, 1)
    assert second["AA"].y + second["AA"].height == 100, "AA sits on the axis"
    assert round(second["AE"].y + second["AE"].height, 1) == second["AA"].y, "AE stacks on AA"
    third = {b.kind for b in drawn.bars if b.x >= 200}
    assert third == {"AR", "other"}, "a message answered with no ACK is 'other'"
    assert drawn.kinds == ["AA", "AE", "AR", "other"] and drawn.ticks[-1][1] == "now"


def test_a_login_goes_on_only_to_a_path_of_this_site() -> None:
    assert _safe_next("/messages?search=1") == "/messages?search=1"
    for target in (
        None,
        "",
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
        "messages",
        "/" + "a" * 600,
    ):
        assert _safe_next(target) == "/", target


def test_times_go_out_in_utc_for_the_browser_to_show_in_its_zone() -> None:
    assert str(when(0)) == '<time datetime="1970-01-01T00:00:00Z">1970-01-01 00:00:00 UTC</time>'
    assert 'datetime="2025-12-31T23:00:00Z"' in str(when("2026-01-01T00:00:00+01:00"))
    assert "—" in str(when(None)) and "&lt;b&gt;" in str(when("<b>"))
    assert (age(45), age(720), age(3900), age(2 * 86400 + 7200)) == ("45 s", "12 min", "1 h 05 min", "2 d 2 h")
