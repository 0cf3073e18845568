// Shared helpers for the sender drivers run by tests/interop/test_interop.py.
//
// Every driver is called as `node js/send_<lib>.mjs HOST PORT FILE...`, sends each file with the
// library under test (one connection, one message at a time, waiting for its ACK) and prints one
// JSON document on stdout:
//   {library, results: [{file, control_id, ack: {text, msh9, msa1, msa2} | null, error}],
//    wire: [{conn, dir: "out" | "in", b64}], errors: [...]}
// `ack` is the acknowledgment as the library reports it; `wire` holds the exact bytes that went
// over the library's TCP socket(s), in order, so the test can check the ACK frames independently.
//
// The wire tap (wiretap.mjs) only records; it never changes what the library sends or receives.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';
import { wire } from './wiretap.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));

export { wire };

export function parseArgs(argv = process.argv.slice(2)) {
  const [host, portText, ...files] = argv;
  const port = Number.parseInt(portText ?? '', 10);
  if (!host || !Number.isInteger(port) || files.length === 0) {
    process.stderr.write(`usage: node ${path.basename(process.argv[1])} HOST PORT FILE...\n`);
    process.exit(2);
  }
  return { host, port, files };
}

/** The fixture as text; fixtures are ASCII/UTF-8 with CR segment separators. */
export function readMessage(file, encoding = 'utf8') {
  return readFileSync(file).toString(encoding);
}

/** MSH-10 of an ER7 text, read with its own field separator. */
export function controlIdOf(text) {
  const msh = text.replace(/^[\s\x0b]+/, '').split(/\r\n|\r|\n/)[0];
  if (!msh.startsWith('MSH') || msh.length < 4) return null;
  const fields = msh.split(msh[3]);
  return fields[9] ?? null;
}

/** MSH-9, MSA-1 and MSA-2 read straight from an ACK text (a plain split, no library). */
export function ackSummary(text) {
  if (text == null) return null;
  const str = String(text);
  const segments = str.split(/\r\n|\r|\n/).filter((s) => s.length > 0);
  const msh = segments.find((s) => s.startsWith('MSH')) ?? '';
  const sep = msh[3] ?? '|';
  const msa = (segments.find((s) => s.startsWith('MSA')) ?? '').split(sep);
  return { text: str, msh9: msh.split(sep)[8] ?? null, msa1: msa[1] ?? null, msa2: msa[2] ?? null };
}

export function libraryVersion(name) {
  try {
    const pkg = JSON.parse(readFileSync(path.join(HERE, '..', 'node_modules', name, 'package.json'), 'utf8'));
    return `${pkg.name}@${pkg.version}`;
  } catch {
    return name;
  }
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Rejects after `ms` so that a missing ACK is reported instead of hanging the test. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export function errorText(err) {
  if (err == null) return null;
  if (err instanceof Error) return `${err.name}: ${err.message}`;
  try {
    return JSON.stringify(err);
  } catch {
    return String(err);
  }
}

/** Print the report and exit; exit status 0 even when a message failed (the test judges). */
export function finish(library, results, errors = [], extra = {}) {
  const report = { library, results, wire, errors: errors.map(errorText), ...extra };
  process.stdout.write(`${JSON.stringify(report)}\n`, () => process.exit(0));
}

/** A hard stop for the whole driver, so the test always gets a report. */
export function watchdog(ms, library, results, errors) {
  const timer = setTimeout(() => {
    errors.push(new Error(`driver watchdog: gave up after ${ms} ms`));
    finish(library, results, errors);
  }, ms);
  timer.unref();
  return timer;
}
