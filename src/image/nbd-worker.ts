// The thread behind NbdImageSource: runs the async NbdClient and answers one
// request at a time (see nbd.ts). Every answer is posted first, then the
// caller is woken, so the answer is waiting when it looks.
import { workerData } from 'node:worker_threads';
import type { MessagePort } from 'node:worker_threads';
import { BlockferryError, ErrorCode } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import { BASE_ALLOCATION, NBD_STATE_HOLE, NBD_STATE_ZERO } from '../nbd/protocol.js';
import type { BridgeReply, BridgeRequest } from './nbd.js';
import type { Extent } from './source.js';

const { uri, timeoutMs, control, data, port } = workerData as {
  uri: string; timeoutMs: number; control: Int32Array; data: SharedArrayBuffer; port: MessagePort;
};
const shared = new Uint8Array(data);
let client: NbdClient | undefined;

async function handle(req: BridgeRequest): Promise<BridgeReply> {
  switch (req.op) {
    case 'open':
      client = await NbdClient.connect(uri, { timeoutMs, contexts: [BASE_ALLOCATION] });
      return { ok: true, size: client.size };
    case 'read':
      await client!.read(req.offset, req.length, shared.subarray(0, req.length));
      return { ok: true };
    case 'extents':
      return { ok: true, extents: await allocated(client!, req.offset, req.length) };
    case 'close':
      await client?.disconnect();
      client = undefined;
      return { ok: true };
  }
}

/** The extents that hold data: neither a hole nor known zeros (both read as zeros, so neither is read). */
async function allocated(c: NbdClient, offset: number, length: number): Promise<Extent[]> {
  if (!c.contexts.has(BASE_ALLOCATION)) return [{ offset, length }];
  const out: Extent[] = [];
  for (const x of await c.blockStatus(offset, length, BASE_ALLOCATION)) {
    if (x.flags & (NBD_STATE_HOLE | NBD_STATE_ZERO)) continue;
    const last = out[out.length - 1];
    if (last && last.offset + last.length === x.offset) last.length += x.length;
    else out.push({ offset: x.offset, length: x.length });
  }
  return out;
}

port.on('message', (req: BridgeRequest) => {
  handle(req)
    .catch((e: unknown): BridgeReply => {
      const code = e instanceof BlockferryError ? e.code : ErrorCode.NBD;
      return { ok: false, code, message: (e as Error).message };
    })
    .then((reply) => {
      port.postMessage(reply);
      Atomics.store(control, 0, 1);
      Atomics.notify(control, 0);
      if (req.op === 'close') port.close();
    });
});
