"""Peer for bench/ingest.py: python-hl7's asyncio MLLP server (``hl7.mllp.start_hl7_server``).

Each frame is parsed with ``hl7.parse`` and answered with ``message.create_ack()``
(AA); a frame python-hl7 cannot parse is answered AE. Nothing is stored.
Connections are persistent: one sender may send any number of messages.

Usage: python bench/peers/python_hl7_server.py [--port 0]; prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import hl7
from hl7.mllp import start_hl7_server


def _error_ack(block: bytes, exc: BaseException) -> bytes:
    head = block.replace(b"\n", b"\r").split(b"\r", 1)[0].decode("latin-1")
    sep = head[3:4] or "|"
    fields = head.split(sep)
    control_id = fields[9] if len(fields) > 9 else ""
    text = str(exc).replace(sep, " ").replace("\r", " ")[:80]
    return f"MSH|^~\\&|PYHL7||||||ACK|A{control_id}|P|2.5\rMSA|AE|{control_id}|{text}\r".encode()


async def handle(reader, writer) -> None:
    try:
        while not writer.is_closing():
            try:
                block = await reader.readblock()
            except asyncio.IncompleteReadError:
                break
            try:
                message = hl7.parse(block.decode(reader.encoding, reader.encoding_errors))
                answer = str(message.create_ack()).encode(writer.encoding)
            except Exception as exc:  # noqa: BLE001 - any parse failure is answered AE
                answer = _error_ack(block, exc)
            writer.writeblock(answer)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    server = await start_hl7_server(handle, host, port, encoding="utf-8")
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
