"""Every fixture over a real loopback socket to the real service: ACK field by field, and the log."""

from __future__ import annotations

import pytest

from .conftest import MANIFEST, RunningService, fixture_bytes, segments

SINGLE = sorted(k for k, v in MANIFEST.items() if "messages" not in v)
BATCHES = sorted(k for k, v in MANIFEST.items() if "messages" in v)


def _from_25(version: str) -> bool:
    """ERR-2/3/4/8 from v2.5 on; ERR-1 before."""
    return tuple(int(p) for p in version.split(".")[:2]) >= (2, 5)


def _sent_header(raw: bytes) -> list[str] | None:
    text = raw.decode("latin-1").lstrip()
    if not text.startswith("MSH") or len(text) < 4:
        return None
    head = text.replace("\n", "\r").split("\r", 1)[0]
    sep = head[3]
    fields = head.split(sep)
    fields.insert(1, sep)
    return fields


@pytest.mark.parametrize("relative", SINGLE)
def test_fixture_ack(service: RunningService, relative: str) -> None:
    expected = MANIFEST[relative]
    raw = fixture_bytes(relative)
    with service.client() as client:
        client.send(raw)
        if expected["ack"] is None:
            # Never answered: prove it by getting the next message's answer first.
            follow = fixture_bytes("siu/s15_cerner_v23.hl7")
            answer = client.request(follow)
            assert segments(answer)["MSA"][2] == MANIFEST["siu/s15_cerner_v23.hl7"]["control_id"]
            return
        answer = client.receive()
    ack = segments(answer, "latin-1")
    msh, msa = ack["MSH"], ack["MSA"]
    assert msa[1] == expected["ack"], f"{relative}: {answer!r}"
    assert msa[2] == (expected["control_id"] or ""), "MSA-2 echoes MSH-10 (empty when there is none to read)"
    assert msh[9].split(msh[2][0])[0] == "ACK"
    assert msh[10], "the ACK has its own control id"
    sent = _sent_header(raw)
    if sent is not None and expected["version"] and expected["ack"] not in ("AR", "CR"):
        assert msh[12] == sent[12], "the ACK keeps the message's version"
        assert msh[2] == sent[2], "the ACK keeps the encoding characters"
        assert (msh[5], msh[6]) == (sent[3], sent[4]), "sender and receiver are swapped"
        if sent[5]:
            assert msh[3] == sent[5]
        assert msh[9].split(msh[2][0])[1] == expected["event"]
    if expected["ack"] in ("AA", "CA"):
        assert "ERR" not in ack
        return
    err = ack["ERR"]
    location = expected["err_location"]
    version = msh[12]
    if _from_25(version):
        comp = msh[2][0]
        assert err[1] == "", "ERR-1 is withdrawn from v2.5 on"
        erl = err[2].split(comp)
        assert erl[:2] == [location.split("-")[0], "1"]
        if "-" in location:
            assert erl[2] == location.split("-")[1].split(".")[0]
        assert err[3].split(comp)[2] == "HL70357"
        assert err[3].split(comp)[0] in {"100", "101", "102", "200", "201", "203", "207"}
        assert err[4] == "E"
        assert err[8], "ERR-8 carries the explanation"
    else:
        comp = msh[2][0] if len(msh) > 2 else "^"
        eld = err[1].split(comp)
        assert eld[:2] == [location.split("-")[0], "1"]
        if "-" in location:
            assert eld[2] == location.split("-")[1].split(".")[0], "ERR-1.3 names the field"
        assert eld[3].split(msh[2][3])[2] == "HL70357"
        assert len(err) == 2, "before v2.5 the ERR segment is ERR-1 alone"
    assert msa[3], "MSA-3 says why"


@pytest.mark.parametrize("relative", BATCHES)
def test_batch_split_and_acknowledged(service: RunningService, relative: str) -> None:
    expected = MANIFEST[relative]["messages"]
    answer = service.request(fixture_bytes(relative))
    text = answer.decode("latin-1")
    lines = [x for x in text.split("\r") if x]
    assert lines[0][:3] in ("FHS", "BHS")
    msas = [x.split("|") for x in lines if x.startswith("MSA")]
    assert [m[1] for m in msas] == [e["ack"] for e in expected]
    assert [m[2] for m in msas] == [e["control_id"] for e in expected]
    bts = next(x for x in lines if x.startswith("BTS"))
    assert bts.split("|")[1] == str(len(expected))


def test_log_holds_every_acked_message(service: RunningService) -> None:
    for relative in SINGLE:
        if MANIFEST[relative]["ack"] in ("AA", "CA"):
            service.request(fixture_bytes(relative))
    rows = service.log()
    logged = {
        (r["sending_application"], r["sending_facility"], r["control_id"])
        for r in rows
        if r["ack_code"] in ("AA", "CA")
    }
    for relative in SINGLE:
        e = MANIFEST[relative]
        if e["ack"] in ("AA", "CA"):
            assert (e["sending_application"], e["sending_facility"], e["control_id"]) in logged, relative
    assert {r["status"] for r in rows} <= {"accepted", "rejected", "ignored", "duplicate"}
