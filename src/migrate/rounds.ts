// Where the blocks of the next pre-copy round come from: a tracked image's
// dirty bitmap (exact and cheap), QEMU's own dirty bitmaps read over NBD
// (exact, for an image QEMU writes), or a rescan compared with what the
// destination holds. All give intervals.
import { randomBytes } from 'node:crypto';
import { IntervalSet, type Interval } from '../blocks/intervals.js';
import { InvalidArgumentError } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import { NBD_STATE_DIRTY, QEMU_DIRTY_BITMAP } from '../nbd/protocol.js';
import { QmpClient } from '../nbd/qmp.js';
import { isUri, parseNbdUri, type NbdTarget } from '../nbd/uri.js';
import type { TrackedImage } from '../image/tracked.js';
import type { Scanner } from '../scan/scanner.js';
import type { ImageFormat } from '../image/source.js';
import type { BlockMap } from '../blockmap/blockmap.js';
import type { DestinationView } from './view.js';

export interface DirtySource {
  /** Blocks written since the last call. */
  take(): Promise<Interval[]>;
  /** Releases what the source holds (a monitor connection, QEMU's bitmaps). */
  close?(): Promise<void>;
  /** Per block, how many rounds found it dirty, when the source counts (strategies may order by heat). */
  readonly writeCounts?: ReadonlyMap<number, number>;
  /** A take costs milliseconds, not a pass over the image: rounds may peek while they send (hold.ts). */
  readonly cheap?: boolean;
}

/** Nothing writes the image: no rounds. */
export const quiet: DirtySource = { take: async () => [] };

export function trackedDirty(t: TrackedImage): DirtySource {
  return { take: async () => t.takeDirty(), cheap: true };
}

/**
 * Where a live migration's rounds come from: QEMU's dirty bitmaps (QMP) when
 * given, else the tracked image's bitmap, else rescans, else nothing writes.
 */
export function dirtySourceFor(o: { dirty?: DirtySource | undefined; tracked?: TrackedImage | undefined; rescan?: boolean | undefined; scanner: Scanner | undefined; path: string; blockSize: number; format?: ImageFormat | undefined }, view: DestinationView): DirtySource {
  if (o.dirty) return o.dirty;
  if (o.tracked) return trackedDirty(o.tracked);
  if (o.rescan && o.scanner) return rescanDirty(o.scanner, o.path, o.blockSize, view, o.format);
  return quiet;
}

/** A dirty source that also counts, per block, the rounds that found it dirty (write counts where the source keeps none). */
export function countingDirty(d: DirtySource, counts: Map<number, number>): DirtySource {
  return {
    take: async () => {
      const list = await d.take();
      for (const iv of list) for (let b = iv.start; b < iv.start + iv.count; b++) counts.set(b, (counts.get(b) ?? 0) + 1);
      return list;
    },
  };
}

/** Another process writes the image: scan it again and compare with the destination. */
export function rescanDirty(scanner: Scanner, path: string, blockSize: number, view: DestinationView, format?: ImageFormat): DirtySource {
  return {
    take: async () => {
      const [now] = await scanner.scan(path, { blockSize, live: true, ...(format ? { format } : {}) });
      return changedBlocks(now!, view);
    },
  };
}

/** Blocks whose content in `now` differs from what the destination holds (data changed, became data, or became zero). */
export function changedBlocks(now: BlockMap, view: DestinationView): Interval[] {
  const out = new IntervalSet();
  for (const r of now.runs()) {
    for (let k = 0; k < r.count; k++) {
      const b = r.start + k;
      if (!view.holds(b, now.fingerprints[r.index + k]!, now.signatures[r.index + k]!)) out.add(b, 1);
    }
  }
  // Data at the destination where the image now reads zeros.
  for (const d of view.data) {
    let at = d.start;
    for (const r of now.runsWithin(d.start, d.count)) {
      if (r.start > at) out.add(at, r.start - at);
      at = r.start + r.count;
    }
    if (at < d.start + d.count) out.add(at, d.start + d.count - at);
  }
  return [...out];
}

/** How often, and how long apart, a temporary export's deletion is retried while its client's disconnect reaches QEMU. */
const EXPORT_DEL_TRIES = 100;
const EXPORT_DEL_PAUSE_MS = 20;

/**
 * QEMU records the writes. A dirty bitmap on the node runs from the start
 * (before the scan); each take() atomically starts the next bitmap and
 * freezes the current one (one QMP transaction, so no write falls between
 * them), exports the node with the frozen bitmap on QEMU's running NBD
 * server, reads it as block status of qemu:dirty-bitmap:NAME, and removes
 * export and bitmap. QEMU 7.2 insists on that order: an enabled bitmap cannot
 * be exported read-only, an exported bitmap cannot be removed, and an export
 * with a client still connected cannot be deleted.
 */
export class QmpDirty implements DirtySource {
  /** Rounds in which each block was dirty (only blocks ever dirty have an entry), for strategies that order by heat. */
  readonly writeCounts = new Map<number, number>();
  readonly cheap = true;
  private round = 0;
  /** Bitmap names: a prefix of its own per migration, so a bitmap left by a crashed run is never taken for this one's. */
  private readonly prefix = `bf-${randomBytes(3).toString('hex')}-`;
  private closed = false;

  private constructor(private readonly qmp: QmpClient, private readonly node: string, private readonly nbd: NbdTarget, private readonly blockSize: number) {}

  /**
   * Starts recording writes to `node`. `source` is the NBD URI blockferry
   * reads the image from: the temporary exports go to the same NBD server.
   */
  static async start(options: { socket: string; node: string }, source: string, blockSize: number): Promise<QmpDirty> {
    if (!isUri(source)) throw new InvalidArgumentError('qmp', 'a source that is an NBD URI of the same QEMU (its NBD server serves the dirty bitmaps)', source);
    const nbd = parseNbdUri(source);
    const qmp = await QmpClient.connect(options.socket);
    const d = new QmpDirty(qmp, options.node, nbd, blockSize);
    try {
      await qmp.execute('block-dirty-bitmap-add', { node: options.node, name: d.name(0), granularity: blockSize });
    } catch (e) {
      qmp.close();
      throw e;
    }
    return d;
  }

  private name(k: number): string {
    return `${this.prefix}${k}`;
  }

  async take(): Promise<Interval[]> {
    const cur = this.name(this.round), next = this.name(this.round + 1), node = this.node;
    await this.qmp.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node, name: next, granularity: this.blockSize } },
        { type: 'block-dirty-bitmap-disable', data: { node, name: cur } },
      ],
    });
    this.round++;
    try {
      return await this.read(cur);
    } finally {
      await this.qmp.execute('block-dirty-bitmap-remove', { node, name: cur });
    }
  }

  /** The blocks a frozen bitmap marks, through a temporary read-only export of the node. */
  private async read(bitmap: string): Promise<Interval[]> {
    const id = `${bitmap}-export`;
    await this.qmp.execute('block-export-add', { type: 'nbd', id, 'node-name': this.node, name: bitmap, writable: false, bitmaps: [bitmap] });
    try {
      const context = QEMU_DIRTY_BITMAP + bitmap;
      const client = await NbdClient.connect({ ...this.nbd, exportName: bitmap }, { contexts: [context] });
      let extents;
      try {
        extents = await client.blockStatus(0, client.size, context);
      } finally {
        await client.disconnect();
      }
      const bs = this.blockSize;
      const out = new IntervalSet();
      for (const x of extents) {
        if (!(x.flags & NBD_STATE_DIRTY)) continue;
        const first = Math.floor(x.offset / bs), end = Math.ceil((x.offset + x.length) / bs);
        out.add(first, end - first);
        for (let b = first; b < end; b++) this.writeCounts.set(b, (this.writeCounts.get(b) ?? 0) + 1);
      }
      return [...out];
    } finally {
      await this.deleteExport(id);
    }
  }

  /** block-export-del, retried while QEMU has not yet seen this client's disconnect ("still in use"). */
  private async deleteExport(id: string): Promise<void> {
    for (let i = 1; ; i++) {
      try {
        await this.qmp.execute('block-export-del', { id });
        return;
      } catch (e) {
        if (i >= EXPORT_DEL_TRIES || !/in use/.test((e as Error).message)) throw e;
        await new Promise((r) => setTimeout(r, EXPORT_DEL_PAUSE_MS));
      }
    }
  }

  /** Removes the bitmap still recording and closes the monitor connection. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.qmp.execute('block-dirty-bitmap-remove', { node: this.node, name: this.name(this.round) });
    } finally {
      this.qmp.close();
    }
  }
}
