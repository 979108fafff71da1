// The extension point for migration strategies. A strategy decides what to
// send and from where; migrate() does what every strategy needs (connect,
// authenticate, BEGIN, scan) and hands it a context. A new strategy is one
// file exporting a Strategy and one entry in STRATEGIES (strategies.ts).
import type { Channel } from '../protocol/channel.js';
import type { ImageSource } from '../image/source.js';
import type { BlockMap } from '../blockmap/blockmap.js';
import type { Scanner } from '../scan/scanner.js';
import type { TrackedImage } from '../image/tracked.js';
import type { BeginOk, Done } from '../protocol/messages.js';
import type { DirtySource } from './rounds.js';

export interface MigrationEvent {
  phase: string;
  detail?: unknown;
}

/** Where a migration stands: one shape for every phase, for bars, logs and programs. */
export interface MigrationProgress {
  phase: 'scan' | 'transfer' | 'rounds' | 'verify' | 'cutover';
  /** Pre-copy round (0 during the first pass). */
  round: number;
  /** Bytes of the image's data accounted for in this phase (sent, filled, found present), and their total. */
  done: number;
  total: number;
  /** Bytes this side has sent so far, and the rate since the start (bytes per second). */
  sentBytes: number;
  rate: number;
}

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
  /** Pre-copy rounds before cutover at most (default 8). */
  maxRounds?: number;
  /** Cut over once a round finds this many dirty blocks or fewer (default 256). */
  dirtyThreshold?: number;
  /** Hybrid (paper 002's Threshold): blocks written this many times or more wait for the post-copy phase (default 2). */
  hotThreshold?: number;
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
  progress: (p: Omit<MigrationProgress, 'sentBytes' | 'rate'>) => void;
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
  /** Post-copy and hybrid: blocks missing at the switch, demand pulls (requests and blocks), blocks the destination's clients wrote first. */
  postcopy?: PostcopyCounts;
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
  run(ctx: MigrationContext): Promise<StrategyOutcome>;
}
