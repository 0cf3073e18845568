// node-hl7-client 3.x: Client.createConnection + Connection.sendMessage, one connection, waitAck.
// The message goes through the library's own Message class ({text}), as an application would.
import { ackSummary, controlIdOf, errorText, finish, libraryVersion, parseArgs, readMessage, sleep, watchdog, withTimeout } from './common.mjs';
import { Client, Message } from 'node-hl7-client';

const { host, port, files } = parseArgs();
const library = libraryVersion('node-hl7-client');
const results = [];
const errors = [];
watchdog(25_000, library, results, errors);

let waiting = null;
const client = new Client({ host, connectionTimeout: 0 });
const connection = client.createConnection({ port, waitAck: true, maxConnectionAttempts: 1 }, async (res) => {
  const msg = res.getMessage();
  const ack = ackSummary(msg.toString());
  // The library's own accessors, next to the plain split in ackSummary.
  ack.lib_msh9 = msg.get('MSH.9.1').toString();
  ack.lib_msa1 = msg.get('MSA.1').toString();
  ack.lib_msa2 = msg.get('MSA.2').toString();
  if (waiting) waiting.resolve(ack);
  else errors.push(new Error(`unexpected ACK: ${JSON.stringify(ack.text)}`));
});
connection.on('client.error', (err) => errors.push(err));
connection.on('data.error', (err) => errors.push(err));

try {
  await withTimeout(new Promise((resolve) => connection.once('connect', resolve)), 5_000, 'the connection');
  for (const file of files) {
    const message = new Message({ text: readMessage(file) });
    const result = { file, control_id: controlIdOf(message.toString()), ack: null, error: null };
    results.push(result);
    try {
      const ackPromise = new Promise((resolve, reject) => {
        waiting = { resolve, reject };
      });
      await connection.sendMessage(message);
      result.ack = await withTimeout(ackPromise, 10_000, `the ACK of ${file}`);
    } catch (err) {
      result.error = errorText(err);
    } finally {
      waiting = null;
    }
  }
  await sleep(200); // anything the bridge sends after the last ACK is captured in `wire`
} catch (err) {
  errors.push(err);
} finally {
  await connection.close().catch((err) => errors.push(err));
  client.closeAll();
}
finish(library, results, errors);
