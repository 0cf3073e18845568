// hl7v2-net: Hl7Client.sendMessageWaitAck(HL7Message.parse(text)), one connection.
//
// Known habit of this client: every message it receives, ACKs included, goes through its router,
// whose final handler answers it with an ACK of its own. So each ACK from the bridge comes back
// to the bridge as an "ACK^..." message, which the bridge must log and never answer (answering
// would start an endless ACK ping-pong). The driver lingers after the last ACK so that any such
// answer from the bridge would show up in `wire` and in `unsolicited`.
import { ackSummary, controlIdOf, errorText, finish, libraryVersion, parseArgs, readMessage, sleep, watchdog, withTimeout } from './common.mjs';
import { HL7Message } from 'hl7v2';
import { Hl7Client } from 'hl7v2-net';

const { host, port, files } = parseArgs();
const library = libraryVersion('hl7v2-net');
const results = [];
const errors = [];
watchdog(25_000, library, results, errors);

const client = Hl7Client.createClient({ host, port, connectTimeout: 5_000, responseTimeout: 10_000 });
client.on('error', (err) => errors.push(err));
const received = [];
client.on('message', (message) => received.push(message.toHL7String()));
const clientSent = [];
client.on('send', (message) => clientSent.push(message.toHL7String()));

try {
  await withTimeout(client.connect(), 5_000, 'the connection');
  for (const file of files) {
    const message = new HL7Message();
    message.parse(readMessage(file));
    const result = { file, control_id: controlIdOf(message.toHL7String()), ack: null, error: null };
    results.push(result);
    try {
      const ack = await withTimeout(client.sendMessageWaitAck(message), 10_000, `the ACK of ${file}`);
      const summary = ackSummary(ack.toHL7String());
      summary.lib_msh9 = ack.header.field(9).toHL7String();
      summary.lib_msa1 = ack.getSegment('MSA')?.field(1).getValue() ?? null;
      summary.lib_msa2 = ack.getSegment('MSA')?.field(2).getValue() ?? null;
      result.ack = summary;
    } catch (err) {
      result.error = errorText(err);
    }
    await sleep(100); // let the client's own ACK of our ACK go out before the next message
  }
  await sleep(700); // an answer from the bridge to those ACKs would arrive here
} catch (err) {
  errors.push(err);
} finally {
  await client.close().catch((err) => errors.push(err));
}
// `received`: every message the library got from the bridge; `client_sent`: every message the
// library put on the wire (our messages plus its unsolicited ACKs of the bridge's ACKs).
finish(library, results, errors, { received, client_sent: clientSent });
