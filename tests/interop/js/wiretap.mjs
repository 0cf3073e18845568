// A wire tap for Node's TCP sockets: records every chunk written to or read from a net.Socket
// (stdio excluded) as {conn, dir: "out" | "in", b64}, in order. It wraps net.Socket's write and
// emit('data') and passes everything through unchanged.
//
// Imported by common.mjs for the drivers; for a third-party CLI run it with
//   node --import <abs path>/wiretap.mjs <cli entry point> ...
// and set HL7_INTEROP_WIRE=<file>: the records are written there as JSON when the process exits.

import { Buffer } from 'node:buffer';
import { writeFileSync } from 'node:fs';
import net from 'node:net';
import process from 'node:process';

export const wire = [];
const ids = new WeakMap();
let nextId = 0;

function isStdio(socket) {
  return socket === process.stdout || socket === process.stderr || socket === process.stdin;
}

function connId(socket) {
  if (!ids.has(socket)) ids.set(socket, nextId++);
  return ids.get(socket);
}

const originalWrite = net.Socket.prototype.write;
net.Socket.prototype.write = function write(chunk, encoding, callback) {
  if (!isStdio(this) && chunk != null) {
    const enc = typeof encoding === 'string' ? encoding : 'utf8';
    const buf = Buffer.isBuffer(chunk) ? Buffer.from(chunk) : Buffer.from(chunk, enc);
    wire.push({ conn: connId(this), dir: 'out', b64: buf.toString('base64') });
  }
  return originalWrite.call(this, chunk, encoding, callback);
};

const originalEmit = net.Socket.prototype.emit;
net.Socket.prototype.emit = function emit(event, ...args) {
  if (event === 'data' && !isStdio(this)) {
    const data = args[0];
    const buf = Buffer.isBuffer(data) ? Buffer.from(data) : Buffer.from(String(data), 'utf8');
    wire.push({ conn: connId(this), dir: 'in', b64: buf.toString('base64') });
  }
  return originalEmit.call(this, event, ...args);
};

if (process.env.HL7_INTEROP_WIRE) {
  const target = process.env.HL7_INTEROP_WIRE;
  process.on('exit', () => writeFileSync(target, JSON.stringify(wire)));
}
