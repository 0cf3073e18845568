"""A structured fuzzer for the reader (issue 16 §1): messages built from segments, fields, repetitions, components,
subcomponents and escape sequences, some of them blown up to thousands of parts, with standard or custom
delimiters and inside or past the limits.

Whatever the shape, reading never raises anything but ``Er7Error`` (answered AR) or ``MessageRejected`` (AE),
every message gets its answer, and the work stays linear in the message's size (counted, not timed:
bench/hostile_shapes.py times it).
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hl7bridge.hl7.er7 import Encoding, Er7Error, Er7Message, Limits
from hl7bridge.hl7.siu import Feed, Header, MessageRejected, read_event

from .dispatch_support import siu
from .test_er7_limits import LIFTED, routed_intake, scanned

_DELIMITERS = "|^~\\&#!$%*+/:;<=>?@`{}"
FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@st.composite
def encodings(draw: st.DrawFn) -> Encoding:
    if draw(st.booleans()):
        return Encoding()
    chars = draw(st.permutations(_DELIMITERS).map(lambda p: "".join(p[:6])))
    truncation = chars[5] if draw(st.booleans()) else None
    return Encoding(chars[0], chars[1], chars[2], chars[3], chars[4], truncation)


def atoms(enc: Encoding) -> st.SearchStrategy[str]:
    e = enc.escape
    return st.one_of(
        st.text(alphabet="ABCXYZ019 .-", min_size=0, max_size=6),
        st.sampled_from(
            [
                f"{e}F{e}",
                f"{e}S{e}",
                f"{e}T{e}",
                f"{e}R{e}",
                f"{e}E{e}",
                f"{e}P{e}",
                f"{e}.br{e}",
                f"{e}H{e}",
                f"{e}N{e}",
                f"{e}X41{e}",
                f"{e}XC3A9{e}",
                f"{e}X4{e}",
                f"{e}Xzz{e}",
                f"{e}C2842{e}",
                f"{e}Q{e}",
                e,
                f"{e}{e}",
                f"{e}.in+4{e}",
            ]
        ),
        st.integers(1, 40).map(lambda n: f"{e}X{'41' * n}{e}"),
    )


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, Encoding]:
    """An SIU message, valid (so that routing and mapping read it) or of random segments, with one part of its
    PID possibly repeated thousands of times."""
    enc = draw(encodings())
    f, c, r, s = enc.field, enc.component, enc.repetition, enc.subcomponent
    atom = atoms(enc)

    def joined(sep: str, part: st.SearchStrategy[str], most: int) -> st.SearchStrategy[str]:
        return st.lists(part, max_size=most).map(sep.join)

    valid = draw(st.booleans())
    if valid:
        event, version = "S12", "2.5.1"
        template = siu("S12", "F1", "APPT1", "20300105093000").decode().strip("\r").split("\r")[1:]
        table = str.maketrans("|^~\\&", f + c + r + enc.escape + s)
        body = [line.translate(table) for line in template if not line.startswith("PID")]
    else:
        event = draw(st.sampled_from(["S12", "S14", "S15", "S23", "S26", "A01", ""]))
        version = draw(st.sampled_from(["2.3", "2.5.1", "2.7", "2.8", "9.9"]))
        field = joined(r, joined(c, joined(s, joined("", atom, 3), 3), 5), 3)
        names = st.sampled_from(["SCH", "PID", "TQ1", "AIS", "AIL", "AIP", "NTE", "ZZ1"])
        body = [f.join([name, *draw(st.lists(field, max_size=14))]) for name in draw(st.lists(names, max_size=8))]
    msh = f.join(["MSH", enc.msh2, "EPIC", "MAIN", "BRIDGE", "X", "20270101120000", "", f"SIU{c}{event}", "F1", "P",
                  version])  # fmt: skip
    blow = draw(st.sampled_from(["none", "repetitions", "components", "subcomponents", "escapes", "segments"]))
    count = draw(st.integers(0, 6000))
    unit = draw(atom) or "x"
    mrn, family = f"MRN100{c}{c}{c}HOSP{c}MR", "TESTPATIENT"
    if blow == "repetitions":
        mrn = r.join([unit] * count + [mrn])
    elif blow == "components":
        mrn = c.join([mrn] + [unit] * count)
    elif blow == "subcomponents":
        mrn = f"MRN100{c}{c}{c}HOSP{s}" + s.join([unit] * count) + f"{c}MR"
    elif blow == "escapes":
        family = "T" + unit * count
    pid = f.join(["PID", "1", "", mrn, "", f"{family}{c}ALICE", "", "19800101", "F"])
    segments = [msh, pid, *body]
    if blow == "segments":
        segments += [f.join(["NTE", str(i), "", unit]) for i in range(count)]
    newline = draw(st.sampled_from(["\r", "\n", "\r\n"]))
    return newline.join(segments) + newline, enc


@FUZZ
@given(messages(), st.booleans())
def test_reading_raises_only_er7_errors_and_rejections(built: tuple[str, Encoding], lifted: bool) -> None:
    text, _enc = built
    limits = LIFTED if lifted else Limits()
    try:
        msg = Er7Message.parse(text, "utf-8", limits)
    except Er7Error as exc:
        assert exc.location[:3].isalnum() and exc.code in (100, 102), (exc.location, exc.code)
        return
    for _leaf in msg.walk():
        pass
    header = Header.of(msg)
    try:
        header.check()
        read_event(msg, header, Feed(ZoneInfo("America/Chicago"), limits=limits))
    except MessageRejected as exc:
        assert exc.problem.location[:3].isalnum()


@FUZZ
@given(messages(), st.booleans())
def test_every_message_is_answered_with_linear_work(built: tuple[str, Encoding], lifted: bool) -> None:
    text, _enc = built
    payload = text.encode("utf-8")
    intake = routed_intake(LIFTED if lifted else None)
    frames = []
    work = scanned(lambda: frames.append(intake.read_frame(payload)))
    (received,) = frames[0].messages
    assert received.ack is not None or (received.header is not None and received.header.enhanced)
    if received.ack is not None and received.ack.code != "AA":
        assert received.problem is not None and received.problem.location[:3].isalnum()
    assert work <= 40 * len(payload) + 20_000, f"{work} characters scanned for a {len(payload)}-byte message"
