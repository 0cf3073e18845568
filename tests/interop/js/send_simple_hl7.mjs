// simple-hl7: Server.createTcpClient({keepalive: true}) + client.send(message, callback), one
// connection. The message is read with the library's own Parser, as an application would.
import { ackSummary, controlIdOf, errorText, finish, libraryVersion, parseArgs, readMessage, sleep, watchdog, withTimeout } from './common.mjs';
import hl7 from 'simple-hl7';

const { host, port, files } = parseArgs();
const library = libraryVersion('simple-hl7');
const results = [];
const errors = [];
watchdog(25_000, library, results, errors);

const client = hl7.Server.createTcpClient({ host, port, keepalive: true });
const parser = new hl7.Parser({ segmentSeperator: '\r' });

try {
  await withTimeout(
    new Promise((resolve, reject) => client.connect((err) => (err ? reject(err) : resolve()))),
    5_000,
    'the connection',
  );
  for (const file of files) {
    const message = parser.parse(readMessage(file));
    const result = { file, control_id: controlIdOf(message.toString()), ack: null, error: null };
    results.push(result);
    try {
      const ack = await withTimeout(
        new Promise((resolve, reject) => client.send(message, (err, reply) => (err ? reject(err) : resolve(reply)))),
        10_000,
        `the ACK of ${file}`,
      );
      const summary = ackSummary(ack.toString());
      // simple-hl7's header fields start at MSH-3: getField(7) is MSH-9.
      summary.lib_msh9 = ack.header.getField(7);
      summary.lib_msa1 = ack.getSegment('MSA')?.getField(1) ?? null;
      summary.lib_msa2 = ack.getSegment('MSA')?.getField(2) ?? null;
      result.ack = summary;
    } catch (err) {
      result.error = errorText(err);
    }
  }
  await sleep(200); // anything the bridge sends after the last ACK is captured in `wire`
} catch (err) {
  errors.push(err);
} finally {
  client.close();
}
finish(library, results, errors);
