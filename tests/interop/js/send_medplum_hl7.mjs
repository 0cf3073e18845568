// @medplum/hl7: Hl7Client.sendAndWait(Hl7Message.parse(text)), one connection (the client keeps
// its connection between sends).
import { ackSummary, controlIdOf, errorText, finish, libraryVersion, parseArgs, readMessage, sleep, watchdog } from './common.mjs';
import { Hl7Message } from '@medplum/core';
import { Hl7Client } from '@medplum/hl7';

const { host, port, files } = parseArgs();
const library = libraryVersion('@medplum/hl7');
const results = [];
const errors = [];
watchdog(25_000, library, results, errors);

const client = new Hl7Client({ host, port, connectTimeout: 5_000 });
client.addEventListener('error', (event) => errors.push(event.error));

try {
  for (const file of files) {
    const message = Hl7Message.parse(readMessage(file));
    const result = { file, control_id: controlIdOf(message.toString()), ack: null, error: null };
    results.push(result);
    try {
      const ack = await client.sendAndWait(message, { timeoutMs: 10_000 });
      const summary = ackSummary(ack.toString());
      summary.lib_msh9 = ack.getSegment('MSH')?.getField(9)?.toString() ?? null;
      summary.lib_msa1 = ack.getSegment('MSA')?.getField(1)?.toString() ?? null;
      summary.lib_msa2 = ack.getSegment('MSA')?.getField(2)?.toString() ?? null;
      result.ack = summary;
    } catch (err) {
      result.error = errorText(err);
    }
  }
  await sleep(200); // anything the bridge sends after the last ACK is captured in `wire`
} catch (err) {
  errors.push(err);
} finally {
  await client.close().catch((err) => errors.push(err));
}
finish(library, results, errors);
