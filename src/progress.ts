// Where a long call stands, in one shape for all of them: a scan, a
// migration (the source's side) and a migration received (the
// destination's side). Programs get it through an `onProgress` option or,
// with `progressOf`, as an async iterator; the CLI's bars and its
// `--progress=json` lines are drawn from the same objects.

/** Which long call an update is about. */
export type Operation = 'scan' | 'migrate' | 'receive';

/**
 * What the call is doing now. scan: reading the image into a block map;
 * transfer: the first pass (fingerprints, needs, data); rounds: live
 * pre-copy rounds; verify: the end-to-end check; cutover: the pause and
 * the last round.
 */
export type Phase = 'scan' | 'transfer' | 'rounds' | 'verify' | 'cutover';

export interface Progress {
  operation: Operation;
  phase: Phase;
  /** The image: its path (scan, migrate) or its name at the destination (receive). */
  path: string;
  /** Bytes of the image accounted for in this phase (scanned; sent, filled or found present; received), and their total. */
  done: number;
  total: number;
  /** Bytes per second since the call started: of `done` for a scan, of bytes on the wire for migrate and receive. */
  rate: number;
  /** Seconds since the call started. */
  elapsed: number;
  /** Pre-copy round (0 during the first pass). */
  round: number;
  /** Blocks of this phase still to go (migrate, receive). */
  blocksLeft?: number;
  /** Bytes this side has sent so far (migrate), or received (receive). */
  sentBytes?: number;
  receivedBytes?: number;
  /** Live rounds: the downtime a cutover now would cost (seconds), the budget, and the rates it comes from (bytes/s). */
  predictedDowntime?: number;
  maxDowntime?: number;
  dirtyRate?: number;
  drainRate?: number;
  /** At the end of the cutover: the downtime measured (seconds). */
  downtime?: number;
}

/** Updates buffered for an iterator that reads slower than they come; beyond it, the oldest are dropped (never the last). */
const ITERATOR_BUFFER = 256;

/** A long call's progress as an async iterator, and its result. */
export interface ProgressRun<T> extends AsyncIterable<Progress> {
  /** The call's own promise: its result, or its error. */
  readonly result: Promise<T>;
}

/**
 * Runs `start` with an onProgress callback and returns its updates as an
 * async iterator that ends when the call settles (with the call's error,
 * if it failed), together with the call's result:
 *
 *     const run = progressOf((onProgress) => migrate(image, { ...options, onProgress }));
 *     for await (const p of run) console.log(p.phase, p.done, p.total);
 *     const result = await run.result;
 *
 * A reader slower than the updates misses some (the buffer keeps the
 * newest ITERATOR_BUFFER); the call never waits for the reader.
 */
export function progressOf<T>(start: (onProgress: (p: Progress) => void) => Promise<T>): ProgressRun<T> {
  const queue: Progress[] = [];
  let wake: (() => void) | undefined;
  let settled: { error?: unknown; failed: boolean } | undefined;
  const notify = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  const result = start((p) => {
    queue.push(p);
    if (queue.length > ITERATOR_BUFFER) queue.shift();
    notify();
  });
  result.then(
    () => { settled = { failed: false }; notify(); },
    (error: unknown) => { settled = { failed: true, error }; notify(); },
  );
  // The error reaches whoever awaits result or iterates; an unread result is not an unhandled rejection.
  result.catch(() => {});
  return {
    result,
    async *[Symbol.asyncIterator]() {
      for (;;) {
        while (queue.length) yield queue.shift()!;
        if (settled) {
          if (settled.failed) throw settled.error;
          return;
        }
        await new Promise<void>((r) => (wake = r));
      }
    },
  };
}
