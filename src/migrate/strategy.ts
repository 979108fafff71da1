// The extension point for migration strategies. A strategy decides what to
// send and from where; migrate() does what every strategy needs (connect,
// authenticate, BEGIN, scan) and hands it a context. A new strategy is one
// file exporting a Strategy and one entry in STRATEGIES (strategies.ts).
import type { Progress } from '../progress.js';
import type { Channel } from '../protocol/channel.js';
import type { ImageFormat, ImageSource } from '../image/source.js';
import type { BlockMap } from '../blockmap/blockmap.js';
import type { Scanner } from '../scan/scanner.js';
import type { TrackedImage } from '../image/tracked.js';
import type { BeginOk, Done } from '../protocol/messages.js';
import type { DirtySource } from './rounds.js';
import type { CutoverReason, SendOrder, StallPolicy, StallReport, ThrottleInfo, ThrottleReport } from './live.js';
import type { HoldReport } from './hold.js';

export interface MigrationEvent {
  phase: string;
  detail?: unknown;
}

/** Where a migration stands: the shape every long call reports (src/progress.ts), with operation 'migrate'. */
export type MigrationProgress = Progress;

/** What a strategy reports; migrate() adds the rest (operation, path, rates, bytes sent, blocks left). */
export type StrategyProgress = Omit<Progress, 'operation' | 'path' | 'rate' | 'elapsed' | 'sentBytes' | 'blocksLeft' | 'receivedBytes'>;

export interface LiveOptions {
  /** Writes go through this tracked image: its dirty bitmap drives the rounds. */
  tracked?: TrackedImage;
  /** Another process writes the image: rescan each round for blocks that changed. */
  rescan?: boolean;
  /**
   * QEMU writes the image and records the writes in dirty bitmaps: its QMP
   * socket and the block node to follow. The image must be read through an
   * NBD URI of the same QEMU (its NBD server serves the bitmaps).
   */
  qmp?: { socket: string; node: string };
  /**
   * The downtime budget, milliseconds (default 300): the rounds end, and
   * the cutover starts, as soon as the predicted downtime fits it.
   */
  maxDowntime?: number;
  /** A limit, not the policy: cut over after this many rounds whatever the prediction (default: no limit). */
  maxRounds?: number;
  /** A limit, not the policy: cut over once a take finds this many dirty blocks or fewer (default 0). */
  dirtyThreshold?: number;
  /** Hybrid (paper 002's Threshold): blocks written this many times or more wait for the post-copy phase (default 2). */
  hotThreshold?: number;
  /**
   * When the rounds cannot bring the prediction within the budget (reported
   * as a `stall` event within three rounds): `wait` keeps trying until
   * `stallTimeout`, then fails with ERR_BF_NO_CONVERGENCE (the destination
   * keeps what it has: migrate again resumes); `force` cuts over anyway
   * (the `cutover` event carries the prediction first); `throttle` calls
   * `throttle` and keeps trying until `stallTimeout`; `postcopy` switches:
   * the destination takes the image over and the dirty blocks follow (the
   * destination must offer post-copy). Default `wait`.
   */
  onStall?: StallPolicy;
  /** Milliseconds after the stall report that `wait` and `throttle` keep trying (default 60 000). */
  stallTimeout?: number;
  /** Slow the writer to `info.wantedRate` bytes/s (`onStall: 'throttle'`); called again with `release` at the end. */
  throttle?: (info: ThrottleInfo) => unknown;
  /**
   * Order of blocks within a round: `hot-last` (default: by write count, cold
   * first), `address`, or `hot-first` (the first pass sends the blocks written
   * most first, when write counts are known: `tracked` or `writeCounts`;
   * rounds as hot-last).
   */
  order?: SendOrder;
  /** Writes per block (at the migration's block size) known before the migration (a hypervisor's record): what hot-first orders by. */
  writeCounts?: ReadonlyMap<number, number>;
  /** Re-sent blocks as deltas against the version last sent, where the destination offers it and it pays (default true). */
  delta?: boolean;
  /**
   * Where takes are cheap (QEMU's bitmaps, a tracked image): peek at the
   * dirty set while a round goes out and skip, until the next round, blocks
   * dirtied since the round began (hold.ts). Default true; no effect with rescans.
   */
  holdDirty?: boolean;
  /** Milliseconds between peeks of holdDirty (default 250; 0: before every batch of 1 MiB). */
  peekInterval?: number;
  /** Cutover: called to pause the writer (a VM's suspend). */
  pause?: () => unknown;
  /** Called once the destination holds the verified image (a VM's resume there). */
  resume?: () => unknown;
}

export interface MigrationContext {
  ch: Channel;
  /** The image as a source of bytes, and its path (for rescans). */
  src: ImageSource;
  path: string;
  map: BlockMap;
  blockSize: number;
  /** Capabilities both sides share. */
  capabilities: number;
  /** How the image is read (rescans read it the same way). */
  format?: ImageFormat;
  /** The destination's answer to BEGIN (a resumed attempt; an image it already took over). */
  begin: BeginOk;
  /** Undefined once the scanner is closed (a migration that is not live needs no rescans). */
  scanner: Scanner | undefined;
  live: LiveOptions;
  /** Writes recorded since before the scan (QEMU's dirty bitmaps), when the rounds come from there. */
  dirty?: DirtySource;
  /** Bytes this side may hold for per-block state beyond its fixed buffers (docs: README, "Memory"). */
  memoryBudget: number;
  event: (phase: string, detail?: unknown) => void;
  progress: (p: StrategyProgress) => void;
  /** Scatter-gather (scatter-gather.ts): runs of this many blocks, each preceded by what `beforeInfo` sends (SG_PLACE). */
  scatter?: ScatterHook;
}

/** How scatter-gather rides on a pre-copy migration: its block map (made already, with SHA-1s) and an SG_PLACE before each BLOCK_INFO run. */
export interface ScatterHook {
  map: BlockMap;
  infoBatch: number;
  beforeInfo(ch: Channel, start: number, count: number): Promise<void>;
}

export interface StrategyOutcome {
  rounds: number;
  /** From pause to the destination's verified commit (0 when nothing was paused). */
  downtimeSeconds: number;
  /** Seconds per phase. */
  phases: Record<string, number>;
  sent: number;
  copied: number;
  resent: number;
  repaired: number;
  /** The destination's own account (DONE). */
  destination: Done;
  /** Bytes of blocks sent again, before frame compression (whole, or the delta codes). */
  resentBytes: number;
  live: LiveReport;
  delta: DeltaReport;
  /** Post-copy and hybrid: blocks missing at the switch, demand pulls (requests and blocks), blocks the destination's clients wrote first. */
  postcopy?: PostcopyCounts;
}

/** How a live migration kept (or did not keep) its downtime promise. */
export interface LiveReport {
  maxDowntimeSeconds: number;
  /** The prediction the cutover was started on (seconds); compare with downtimeSeconds. */
  predictedDowntimeSeconds: number;
  cutoverReason: CutoverReason;
  /** Measured at the cutover: rounds' drain rate and the writer's dirty rate (bytes/s), the fixed cost (seconds). */
  drainRate: number;
  dirtyRate: number;
  fixedSeconds: number;
  /** Seconds the pause and resume actions took (inside the measured downtime). */
  pauseSeconds: number;
  resumeSeconds: number;
  /** Where the measured downtime went: the last take (rescan or bitmap; it overlaps the send), sending the last round, the check (with repairs), COMMIT. */
  cutoverSeconds: { take: number; send: number; check: number; commit: number };
  /** Bytes of blocks the last round had to send. */
  cutoverBytes: number;
  order: SendOrder;
  /** Blocks sent again that were hot when sent (written at least twice: a tracked image's counts, or found dirty by two takes running): what hot-last keeps down. */
  hotBlocksResent: number;
  stall?: StallReport;
  throttle?: ThrottleReport;
  /** Blocks held back from their round because a peek found them dirty, and the peeks (holdDirty). */
  held?: HoldReport;
}

export interface DeltaReport {
  /** Whether deltas were on (the destination offers CAP_DELTA, the image is live, not turned off). */
  enabled: boolean;
  blocks: number;
  /** Bytes of the blocks sent as deltas, and of their codes and entries on the wire (before frame compression). */
  rawBytes: number;
  wireBytes: number;
  savedBytes: number;
}

export interface PostcopyCounts {
  missingAtSwitch: number;
  pulls: number;
  pulledBlocks: number;
  owned: number;
}

export interface Strategy {
  /** Its name in the API and on the command line. */
  readonly name: string;
  /** Fill sources the destination consults before asking for blocks (FILL_* bits of BEGIN). */
  readonly fills: number;
  /** Capabilities (CAP_* bits) the destination must offer. */
  readonly requires: number;
  /**
   * Whether it can switch to post-copy when the rounds stall (`onStall:
   * 'postcopy'`); migrate() refuses that policy for strategies without it.
   * Pre-copy switches through postcopy.ts's switchOver; hybrid always
   * switches on a stall.
   */
  readonly postcopyOnStall?: boolean;
  run(ctx: MigrationContext): Promise<StrategyOutcome>;
}
