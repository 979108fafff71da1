// A minimal QMP client (QEMU's monitor protocol: JSON lines over a Unix
// socket): the greeting, qmp_capabilities, then commands matched to their
// answers by id. Events are ignored. Enough to drive dirty bitmaps and NBD
// exports of a QEMU or qemu-storage-daemon for live migration rounds.
import net from 'node:net';
import { BlockferryError, ErrorCode, InvalidArgumentError } from '../errors.js';
import { escapeForLog } from '../util/sanitize.js';

/** Default deadline for the greeting and for each command's answer. */
export const QMP_DEFAULT_TIMEOUT_MS = 30_000;
/** Longest line accepted from the monitor (answers here are small; a query of everything is not asked). */
const MAX_LINE = 16 << 20;

function qmpError(message: string, cause?: unknown): BlockferryError {
  return new BlockferryError(ErrorCode.QMP, message, cause === undefined ? undefined : { cause });
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class QmpClient {
  private buffered = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private greeting: ((line: Record<string, unknown>) => void) | undefined;
  private failure: BlockferryError | undefined;

  private constructor(private readonly socket: net.Socket, readonly path: string, private readonly timeoutMs: number) {}

  /** Connects to a QMP socket and leaves capabilities negotiation mode. */
  static async connect(path: string, options: { timeoutMs?: number } = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? QMP_DEFAULT_TIMEOUT_MS;
    if (!Number.isInteger(timeoutMs) || timeoutMs < 1) throw new InvalidArgumentError('timeoutMs', 'a positive integer', timeoutMs);
    const socket = net.connect({ path });
    const c = new QmpClient(socket, path, timeoutMs);
    socket.setEncoding('utf8');
    socket.on('data', (s: string) => c.onData(s));
    socket.on('error', (e: NodeJS.ErrnoException) => c.fail(qmpError(`QMP socket ${path}: ${e.code ?? e.message}`, e)));
    socket.on('close', () => c.fail(qmpError(`QMP socket ${path} closed`)));
    try {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new BlockferryError(ErrorCode.TIMEOUT, `no QMP greeting on ${path} within ${timeoutMs} ms`)), timeoutMs);
        c.greeting = (line) => {
          clearTimeout(timer);
          if (line.QMP && typeof line.QMP === 'object') resolve();
          else reject(qmpError(`${path} is not a QMP monitor (first line: ${escapeForLog(JSON.stringify(line))})`));
        };
        socket.once('close', () => { clearTimeout(timer); reject(c.failure); });
      });
      await c.execute('qmp_capabilities');
    } catch (e) {
      c.fail(e instanceof BlockferryError ? e : qmpError(String(e)));
      throw e;
    }
    return c;
  }

  /** Runs a command; resolves with its "return" value, rejects with ERR_BF_QMP carrying QEMU's error class and description. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.failure) return Promise.reject(this.failure);
    const id = `bf-${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new BlockferryError(ErrorCode.TIMEOUT, `QMP ${command}: no answer within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  close(): void {
    this.fail(qmpError(`QMP connection to ${this.path} closed`));
  }

  private onData(s: string): void {
    this.buffered += s;
    let nl: number;
    while ((nl = this.buffered.indexOf('\n')) >= 0) {
      const line = this.buffered.slice(0, nl).trim();
      this.buffered = this.buffered.slice(nl + 1);
      if (line) this.onLine(line);
    }
    if (this.buffered.length > MAX_LINE) this.fail(qmpError(`QMP monitor ${this.path} sent a line over ${MAX_LINE} bytes`));
  }

  private onLine(text: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(text) as Record<string, unknown>;
      if (!msg || typeof msg !== 'object') throw new Error('not an object');
    } catch {
      return this.fail(qmpError(`QMP monitor ${this.path} sent something that is not a JSON object: ${escapeForLog(text)}`));
    }
    if (this.greeting) {
      const g = this.greeting;
      this.greeting = undefined;
      return g(msg);
    }
    if ('event' in msg) return; // events are not needed here
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p) return this.fail(qmpError(`QMP monitor ${this.path} answered an unknown id: ${escapeForLog(text)}`));
    this.pending.delete(id!);
    clearTimeout(p.timer);
    if ('return' in msg) return p.resolve(msg.return);
    const err = msg.error as { class?: unknown; desc?: unknown } | undefined;
    p.reject(qmpError(`QMP ${p.command} failed: ${escapeForLog(String(err?.desc ?? 'no description'))} (${escapeForLog(String(err?.class ?? 'no class'))})`));
  }

  private fail(e: BlockferryError): void {
    this.failure ??= e;
    for (const p of this.pending.values()) { clearTimeout(p.timer); p.reject(this.failure); }
    this.pending.clear();
    this.socket.destroy();
  }
}
