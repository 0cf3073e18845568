"""Peer for bench/ingest.py: hl7apy's own threaded ``hl7apy.mllp.MLLPServer``.

Each message is parsed with ``hl7apy.parser.parse_message`` (default arguments) and
answered with an AA built with hl7apy; a message hl7apy cannot parse reaches the
``ERR`` handler and is answered AE. Nothing is stored.

Stock behaviour kept as is: one thread per connection, and one message per
connection (``MLLPRequestHandler.handle`` reads a single frame, answers it and
closes the socket). Only the listen backlog is raised from socketserver's 5 to 128,
so that 20 senders reconnecting at once are not dropped by the kernel (a 1 s SYN
retry would otherwise dominate the latency figures).

Usage: python bench/peers/hl7apy_server.py [--port 0]; prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings

from hl7apy.core import Message
from hl7apy.mllp import AbstractErrorHandler, AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

warnings.filterwarnings("ignore")


class SiuHandler(AbstractHandler):
    def reply(self) -> str:
        msg = parse_message(self.incoming_message)
        ack = Message("ACK", version=msg.version)
        ack.msh.msh_3 = msg.msh.msh_5.value or "HL7APY"
        ack.msh.msh_4 = msg.msh.msh_6.value
        ack.msh.msh_5 = msg.msh.msh_3.value
        ack.msh.msh_6 = msg.msh.msh_4.value
        ack.msh.msh_9 = "ACK"
        ack.msh.msh_10 = "A" + msg.msh.msh_10.value
        ack.msh.msh_11 = msg.msh.msh_11.value
        ack.msa.msa_1 = "AA"
        ack.msa.msa_2 = msg.msh.msh_10.value
        return ack.to_mllp()


class ErrorHandler(AbstractErrorHandler):
    """hl7apy could not parse the message: answer AE with whatever MSH-10 a plain split finds."""

    def reply(self) -> str:
        head = self.incoming_message.replace("\n", "\r").split("\r", 1)[0]
        sep = head[3:4] or "|"
        fields = head.split(sep)
        control_id = fields[9] if len(fields) > 9 else ""
        text = str(self.exc).replace(sep, " ").replace("\r", " ")[:80]
        return f"\x0bMSH|^~\\&|HL7APY||||||ACK|A{control_id}|P|2.5\rMSA|AE|{control_id}|{text}\r\x1c\x0d"


class Server(MLLPServer):
    request_queue_size = 128


class AnyType(dict):
    """The handlers dict, keyed by MSH-9 as received (``SIU^S12^SIU_S12``, ``SIU^S12``, ``SIU#S12``...)."""

    def __missing__(self, key: str) -> tuple:
        return (SiuHandler,)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    handlers = AnyType(ERR=(ErrorHandler,))
    server = Server(args.host, args.port, handlers)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
