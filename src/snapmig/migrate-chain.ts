// SnapMig's coordinator (paper 000, Algorithm 1 and Fig. 6), run by the
// source: it asks the backup servers what they hold (the snapshot index),
// plans who sends which layer, has the backup servers send their hits while
// the source sends the misses and then the active layer (live, with rounds
// and a cutover like any migration), and has the destination check and
// assemble the chain. FullMig and SelectiveMig, the paper's baselines, are
// the same command with another plan. A backup server that fails or
// vanishes mid-send costs the source its layers (the destination resumes
// the partial image the backup server left: only what is missing crosses).
import { BlockferryError, ErrorCode, InvalidArgumentError, ProtocolError } from '../errors.js';

/** Seconds a source send retries a name the destination says is busy (a vanished sender's session not yet taken over). */
const BUSY_RETRIES = 30;
/**
 * Layers one backup server sends at once, each over its own connection (a
 * backup server answers one request at a time per connection). One, by
 * default: a layer's send is CPU-bound at both ends (reading, hashing,
 * compressing; checking, writing), and on the bench's two shared cores two
 * or three side by side were slower than one after another (33.9 s against
 * 27.8 s, docs/BENCHMARKS.md). A backup server and a destination with cores
 * to spare can be given more.
 */
export const DEFAULT_BACKUP_PARALLEL = 1;
import { Channel } from '../protocol/channel.js';
import { CAP_SNAPMIG, clientHandshake, type AuthOptions } from '../protocol/handshake.js';
import {
  CHAIN_BEGIN, CHAIN_BEGIN_OK, CHAIN_CHECK_ONLY, CHAIN_COMMIT, CHAIN_DONE, CHAIN_FLATTEN, CHAIN_OVERWRITE, LAYERS, LAYERS_RESULT, LAYER_ABSENT,
  SEND_LAYER, SEND_LAYER_RESULT, SEND_OVERWRITE, VERDICT_OK, trafficTotal, type ChainLayerCommit, type MessageDef,
} from '../protocol/messages.js';
import { connect } from '../transport/tcp.js';
import { connect as connectTls, securityFrom, type TlsOptions } from '../transport/tls.js';
import { Qcow2ImageSource, isQcow2File } from '../image/qcow2.js';
import { FileImageSource, sourceName } from '../image/source.js';
import { Scanner } from '../scan/scanner.js';
import { migrate, type MigrationResult } from '../migrate/migrate.js';
import type { LiveOptions } from '../migrate/strategy.js';
import { layerIdentity, stackMap } from './identity.js';
import { planMigration, replan, SnapshotIndex, SOURCE, type ChainLayer, type MergedPrefix, type Plan, type PlannedSend, type SnapStrategy, SNAP_STRATEGIES } from './plan.js';
import { NO_IDENTITY } from '../roles/destination/chain.js';

export interface ChainMigrateOptions {
  /** The destination, HOST:PORT. */
  to: string;
  /** Backup servers (`serve --role backup`), HOST:PORT each. */
  backups?: string[];
  strategy: SnapStrategy;
  /** The destination writes the chain merged (NAME.img) instead of the chain. SelectiveMig always does. */
  flatten?: boolean;
  /** Name at the destination (default: the top file's name without extension). */
  name?: string;
  auth: AuthOptions;
  tls?: TlsOptions;
  /** How to reach the backup servers (default: auth and tls). */
  backupAuth?: AuthOptions;
  backupTls?: TlsOptions;
  overwrite?: boolean;
  /** Layers each backup server sends at once (default DEFAULT_BACKUP_PARALLEL: one after another). */
  backupParallel?: number;
  /** Where layer identities are cached (default: none: computed each time). */
  cacheDir?: string;
  scanner?: Scanner;
  /** The source's own sends, bytes per second. */
  bwlimit?: number;
  /** Live: the active layer changes during the migration (rescan rounds, pause and resume at the cutover). */
  live?: LiveOptions;
  onEvent?: (e: { phase: string; detail?: unknown }) => void;
}

/** What one send did. */
export interface LayerSendReport {
  layers: number[];
  image: string;
  sender: string;
  reason: PlannedSend['reason'];
  dataBytes: number;
  /** Bytes its sender put on the wire (frames, both ways of the layer's own connection as its sender counts them). */
  wireBytes: number;
  seconds: number;
  /** Held at the destination already (a resumed migration): not sent again. */
  skipped: boolean;
  /** Blocks the destination kept from an earlier attempt at this layer (a sender that was interrupted), source sends only. */
  resumedBlocks?: number;
  /** Pre-copy rounds of its migration (source sends; the active layer's live rounds). */
  rounds?: number;
  /** The planned sender failed; the source sent it instead (why). */
  fallbackFrom?: string;
  fallbackReason?: string;
}

export interface ChainMigrationResult {
  name: string;
  strategy: SnapStrategy;
  flatten: boolean;
  seconds: number;
  /** The active layer's cutover plus the destination's assembly (0 when not live). */
  downtimeSeconds: number;
  /** Seconds spent computing layer identities (0 when cached). */
  identitySeconds: number;
  plan: Plan;
  sends: LayerSendReport[];
  /** Wire bytes each sender sent, by sender. */
  bytesBySender: Record<string, number>;
  /** Bytes of the active layer's data clusters at the end: SnapMig's source-bytes goal is against this. */
  activeLayerBytes: number;
  /** Backup servers that failed or could not be reached. */
  backupsLost: string[];
  /** What the destination wrote: the chain's layer images and manifest, or NAME.img. */
  written: boolean;
}

interface Link { ch: Channel; close(): void }

async function link(to: string, auth: AuthOptions, tls: TlsOptions | undefined): Promise<Link> {
  const security = securityFrom(auth, tls);
  const socket = security.mode === 'insecure' ? await connect(to) : await connectTls(to, security);
  const ch = new Channel(socket);
  try {
    const caps = await clientHandshake(ch, { ...auth, certificates: security.mode === 'cert' }, CAP_SNAPMIG);
    if (!(caps & CAP_SNAPMIG)) throw new BlockferryError(ErrorCode.REFUSED, `${to} does not offer SnapMig (capability bit 128)`);
  } catch (e) {
    socket.destroy();
    throw e;
  }
  return { ch, close: () => socket.destroy() };
}

/** The chain's files, base first. */
export function chainFiles(top: string): string[] {
  if (!isQcow2File(top)) { new FileImageSource(top).close(); return [top]; }
  const src = new Qcow2ImageSource(top, null, (p) => new FileImageSource(p));
  try {
    return src.layers.map((l) => l.path).reverse();
  } finally {
    src.close();
  }
}

/** Migrates a qcow2 chain (its top file given) with SnapMig, FullMig or SelectiveMig. */
export async function migrateChain(top: string, o: ChainMigrateOptions): Promise<ChainMigrationResult> {
  const t0 = performance.now();
  if (!SNAP_STRATEGIES.includes(o.strategy)) throw new InvalidArgumentError('strategy', SNAP_STRATEGIES.join(', '), o.strategy);
  const name = o.name ?? sourceName(top);
  const files = chainFiles(top);
  const active = files.length - 1;
  const event = (phase: string, detail?: unknown) => o.onEvent?.({ phase, detail });
  const ownScanner = !o.scanner;
  const scanner = o.scanner ?? new Scanner();
  const links = new Map<string, Link>();
  /** More connections to backup servers, one per layer sent at once beyond the first. */
  const extraLinks: Link[] = [];
  let dst: Link | undefined;
  try {
    // Identities of the layers (the active one changes: none), cached by the files' identity.
    const tId = performance.now();
    const chain: ChainLayer[] = [];
    const wantIds = o.strategy === 'snapmig' && (o.backups?.length ?? 0) > 0;
    for (const [i, f] of files.entries()) {
      const m = stackMap(f, 1);
      const identity = wantIds && i < active ? (await layerIdentity(f, 1, { scanner, cacheDir: o.cacheDir })).id : undefined;
      chain.push({ index: i, identity, dataBytes: m.dataBytes });
    }
    const prefixes: MergedPrefix[] = [];
    if (wantIds && o.flatten) {
      for (let k = 1; k < active; k++) {
        const p = await layerIdentity(files[k]!, k + 1, { scanner, cacheDir: o.cacheDir });
        prefixes.push({ top: k, identity: p.id, dataBytes: p.dataBytes });
      }
    }
    const identitySeconds = (performance.now() - tId) / 1000;
    // The snapshot index: what each backup server holds.
    const index = new SnapshotIndex();
    const lost = new Set<string>();
    if (o.strategy === 'snapmig') {
      for (const b of o.backups ?? []) {
        try {
          const l = await link(b, o.backupAuth ?? o.auth, o.backupTls ?? o.tls);
          links.set(b, l);
          for (const h of await l.ch.request(LAYERS, undefined, LAYERS_RESULT)) index.add({ server: b, identity: h.identity, depth: h.depth, dataBytes: h.dataBytes });
        } catch (e) {
          lost.add(b);
          event('backup-lost', { server: b, error: (e as Error).message });
        }
      }
    }
    const plan = planMigration({ strategy: o.strategy, chain, index, flatten: !!o.flatten, prefixes });
    event('plan', plan);
    const sends: LayerSendReport[] = [];
    const bySender: Record<string, number> = {};
    const account = (r: LayerSendReport) => { sends.push(r); bySender[r.sender] = (bySender[r.sender] ?? 0) + r.wireBytes; };
    // The VM resumes at the destination once the chain is written there, not when its active layer is.
    const { resume, ...liveOpts } = o.live ?? {};
    const common = { to: o.to, auth: o.auth, scanner, ...(o.tls ? { tls: o.tls } : {}), ...(o.bwlimit ? { bwlimit: o.bwlimit } : {}) };

    if (o.strategy === 'selectivemig') {
      // The latest state only: the chain read through, one image, no snapshots.
      const r = await migrate(top, { ...common, ...o.live, name, strategy: 'full', ...(o.overwrite ? { overwrite: true } : {}) });
      account({ layers: plan.sends[0]!.layers, image: name, sender: SOURCE, reason: 'latest-state', dataBytes: plan.sends[0]!.dataBytes, wireBytes: trafficTotal(r.wire.sent), seconds: r.seconds, skipped: false });
      return {
        name, strategy: o.strategy, flatten: true, seconds: (performance.now() - t0) / 1000, downtimeSeconds: r.downtimeSeconds, identitySeconds, plan, sends,
        bytesBySender: bySender, activeLayerBytes: stackMap(top, 1).dataBytes, backupsLost: [...lost], written: true,
      };
    }

    const imageOf = (s: PlannedSend) => s.layers.length === 1 ? `${name}.L${s.layers[0]}` : `${name}.L${s.layers[0]}-${s.layers[s.layers.length - 1]}`;
    // One short connection per request: layers take longer than the destination's idle deadline.
    const toDst = async <Q, A>(d: MessageDef<Q>, m: Q, answer: MessageDef<A>): Promise<A> => {
      dst = await link(o.to, o.auth, o.tls);
      try {
        return await dst.ch.request(d, m, answer);
      } finally {
        dst.close();
        dst = undefined;
      }
    };
    const states = await toDst(CHAIN_BEGIN, { name, layers: plan.sends.map((s) => ({ image: imageOf(s), identity: s.identity ?? NO_IDENTITY })) }, CHAIN_BEGIN_OK);
    const held = new Set(plan.sends.filter((_, i) => states[i] !== LAYER_ABSENT).map(imageOf));

    // The source sends a layer: an ordinary migration of the layer's own view.
    const fromSource = async (s: PlannedSend, extra: Partial<LayerSendReport> = {}, live = false, overwrite = !!o.overwrite): Promise<MigrationResult> => {
      const f = files[s.layers[s.layers.length - 1]!]!;
      // A layer a vanished backup server was sending may still be held by its session at the destination:
      // that session is taken over once silent for the destination's grace (5 s by default), so BUSY is retried a while.
      let r: MigrationResult | undefined;
      for (let attempt = 0; !r; attempt++) {
        try {
          // The active layer hot blocks first (paper 000's snapshot scheduling) where write counts are known (live.tracked, live.writeCounts).
          r = await migrate(f, { ...common, ...(live ? { order: 'hot-first' as const, ...liveOpts } : {}), name: imageOf(s), strategy: 'full', format: `qcow2-stack:${s.layers.length}`, overwrite });
        } catch (e) {
          if (!(e instanceof ProtocolError && e.remoteCode === ErrorCode.BUSY) || attempt >= BUSY_RETRIES) throw e;
          event('busy-retry', { layer: imageOf(s), attempt });
          await new Promise((res) => setTimeout(res, 1000));
        }
      }
      account({ layers: s.layers, image: imageOf(s), sender: SOURCE, reason: s.reason, dataBytes: s.dataBytes, wireBytes: trafficTotal(r.wire.sent), seconds: r.seconds, skipped: false, resumedBlocks: r.blocks.resumed, rounds: r.rounds, ...extra });
      return r;
    };
    const skip = (s: PlannedSend) => account({ layers: s.layers, image: imageOf(s), sender: s.sender, reason: s.reason, dataBytes: s.dataBytes, wireBytes: 0, seconds: 0, skipped: true });

    // Backup servers send their hits, all at once, each up to backupParallel layers side by side (oldest first, each
    // over its own connection); what one of them fails to send, the source sends.
    const fallback: PlannedSend[] = [];
    const servers = [...new Set(plan.sends.filter((s) => s.sender !== SOURCE).map((s) => s.sender))];
    const parallel = o.backupParallel ?? DEFAULT_BACKUP_PARALLEL;
    if (!Number.isInteger(parallel) || parallel < 1) throw new InvalidArgumentError('backupParallel', 'a whole number of at least 1', parallel);
    const backupsDone = Promise.all(servers.map(async (server) => {
      const queue: PlannedSend[] = [];
      for (const x of plan.sends.filter((y) => y.sender === server)) {
        if (held.has(imageOf(x))) skip(x);
        else queue.push(x);
      }
      const worker = async (w: number) => {
        let l = w === 0 ? links.get(server) : undefined;
        for (let s = queue.shift(); s; s = queue.shift()) {
          if (lost.has(server)) { fallback.push(s); continue; }
          const t = performance.now();
          try {
            if (!l) extraLinks.push(l = await link(server, o.backupAuth ?? o.auth, o.backupTls ?? o.tls));
            const r = await l.ch.request(SEND_LAYER, { identity: s.identity!, to: o.to, name: imageOf(s), flags: o.overwrite ? SEND_OVERWRITE : 0 }, SEND_LAYER_RESULT);
            account({ layers: s.layers, image: imageOf(s), sender: server, reason: s.reason, dataBytes: s.dataBytes, wireBytes: r.wireBytes, seconds: (performance.now() - t) / 1000, skipped: false });
          } catch (e) {
            lost.add(server);
            event('backup-lost', { server, layer: imageOf(s), error: (e as Error).message });
            fallback.push(s);
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(parallel, queue.length) }, (_, w) => worker(w)));
    }));
    // Meanwhile the source sends its misses (oldest first), then, after every other layer is there, the active layer.
    for (const s of plan.sends) {
      if (s.sender !== SOURCE || s.reason === 'active') continue;
      if (held.has(imageOf(s))) skip(s);
      else await fromSource(s);
    }
    await backupsDone;
    fallback.sort((a, b) => a.layers[0]! - b.layers[0]!);
    // A lost server's sends, layer by layer, from the source (the destination resumes what the server left).
    const again = replan({ ...plan, sends: fallback }, new Set(fallback.map((s) => s.sender)), chain).sends;
    for (const s of again) {
      const was = fallback.find((f) => f.layers.includes(s.layers[0]!))!;
      await fromSource(s, { fallbackFrom: was.sender, fallbackReason: 'the backup server failed or went away' });
    }
    const finalSends = [...plan.sends.filter((s) => !fallback.includes(s)), ...again].sort((a, b) => a.layers[0]! - b.layers[0]!);
    const commitOf = (s: PlannedSend): ChainLayerCommit => {
      const m = stackMap(files[s.layers[s.layers.length - 1]!]!, s.layers.length);
      return { image: imageOf(s), identity: s.sender === SOURCE ? NO_IDENTITY : s.identity!, check: s.sender !== SOURCE, bottom: m.bottom, size: m.size, covered: m.covered };
    };
    const flags = (o.flatten ? CHAIN_FLATTEN : 0) | (o.overwrite ? CHAIN_OVERWRITE : 0);
    const older = finalSends.filter((s) => s.reason !== 'active');
    // Check what the backup servers sent before the cutover: a layer that is not what the source's chain says is sent again by the source.
    if (older.length) {
      const checked = await toDst(CHAIN_COMMIT, { name, size: stackMap(top, 1).size, flags: CHAIN_CHECK_ONLY, layers: older.map(commitOf) }, CHAIN_DONE);
      for (const [i, v] of checked.verdicts.entries()) {
        if (v === VERDICT_OK) continue;
        const s = older[i]!;
        event('layer-rejected', { layer: imageOf(s), sender: s.sender, verdict: v });
        const redo: PlannedSend = { ...s, sender: SOURCE, reason: 'miss', identity: undefined, depth: s.layers.length };
        finalSends[finalSends.indexOf(s)] = redo;
        await fromSource(redo, { fallbackFrom: s.sender, fallbackReason: 'content did not match the layer identity' });
      }
    }
    // The active layer, live: rounds and the cutover as any migration.
    const act = finalSends.find((s) => s.reason === 'active')!;
    let downtime = 0;
    // Sent every time: it may have changed since an earlier attempt committed it (that image is this chain's: replaced).
    const isLive = !!(o.live?.rescan || o.live?.tracked || o.live?.qmp || o.live?.pause);
    const actResult = await fromSource(act, {}, true, !!o.overwrite || held.has(imageOf(act)));
    if (isLive) downtime = actResult.downtimeSeconds; // nothing paused: no downtime
    const tCommit = performance.now();
    const done = await toDst(CHAIN_COMMIT, { name, size: stackMap(top, 1).size, flags, layers: finalSends.map(commitOf) }, CHAIN_DONE);
    if (!done.written) throw new BlockferryError(ErrorCode.LAYER_MISMATCH, `the destination did not write chain ${name}: layer verdicts ${done.verdicts.join(',')}`);
    if (resume) await resume();
    if (isLive) downtime += (performance.now() - tCommit) / 1000;
    event('done');
    return {
      name, strategy: o.strategy, flatten: !!o.flatten, seconds: (performance.now() - t0) / 1000, downtimeSeconds: downtime, identitySeconds, plan, sends,
      bytesBySender: bySender, activeLayerBytes: stackMap(top, 1).dataBytes, backupsLost: [...lost], written: true,
    };
  } finally {
    dst?.close();
    for (const l of [...links.values(), ...extraLinks]) l.close();
    if (ownScanner) await scanner.close();
  }
}
