// The snapshot index and the migration plan (paper 000, Algorithm 1 and
// section 3.2's Snapshot Indexing, Coordination and Consolidation), as pure
// functions over facts gathered elsewhere: the source's chain with each
// layer's identity, and what every backup server holds.
//
// A chain here is bottom first: layer 0 is the base, the last is the active
// layer (the one the VM writes). A plan is a list of sends, each one layer
// (or, consolidated, several adjacent layers merged) and who sends it:
//   - a layer some backup server holds (a hit) is sent by that server;
//   - a layer nobody else holds (a miss) and the active layer by the source;
//   - consolidation: where the destination does not keep layers apart
//     (flatten), a run of bottom layers a server holds merged is sent as one
//     when that moves fewer bytes than sending them one by one. A server's
//     merged stack that equals one source layer (the production server
//     consolidated snapshots 1–4 into its base, the backup server kept them:
//     paper 000 Table 1) is a hit like any other, found by identity.
// FullMig: the source sends every layer. SelectiveMig: the source sends the
// latest state only (the chain merged; snapshots are dropped).

/** What a backup server holds: a stack of `depth` layers of one of its files, merged, with its identity. */
export interface Holding {
  server: string;
  /** The server's own handle for the stack (it resolves it, never a path from us). */
  identity: string;
  depth: number;
  dataBytes: number;
}

/** Which servers hold which layer, by identity (paper 000's Snapshot Indexing). */
export class SnapshotIndex {
  private readonly byId = new Map<string, Holding[]>();

  add(h: Holding): void {
    const list = this.byId.get(h.identity) ?? [];
    if (!list.some((x) => x.server === h.server)) list.push(h);
    this.byId.set(h.identity, list);
  }

  /** Servers holding a layer of this identity (any depth: a merged stack counts). */
  holders(identity: string | undefined): readonly Holding[] {
    return identity ? this.byId.get(identity) ?? [] : [];
  }

  /** Forgets a server (it went away): its layers are misses from now on. */
  drop(server: string): void {
    for (const [id, list] of this.byId) {
      const left = list.filter((h) => h.server !== server);
      if (left.length) this.byId.set(id, left);
      else this.byId.delete(id);
    }
  }

  get size(): number {
    return this.byId.size;
  }
}

/** One layer of the source's chain, bottom first. */
export interface ChainLayer {
  /** Position in the chain, 0 = base. */
  index: number;
  /** Identity of the layer alone; undefined for the active layer (it changes: always the source's). */
  identity?: string | undefined;
  /** Bytes of its data clusters. */
  dataBytes: number;
}

/** The merged stack of layers 0..top of the source's chain (for consolidation under flatten). */
export interface MergedPrefix {
  top: number;
  identity: string;
  dataBytes: number;
}

export type SnapStrategy = 'snapmig' | 'fullmig' | 'selectivemig';
export const SNAP_STRATEGIES: readonly SnapStrategy[] = ['snapmig', 'fullmig', 'selectivemig'];

export type SendReason = 'hit' | 'miss' | 'active' | 'consolidated' | 'latest-state';

/** One send of the plan. */
export interface PlannedSend {
  /** Source layers it carries, bottom first (several: merged). */
  layers: number[];
  /** 'source' or a backup server's address. */
  sender: string;
  reason: SendReason;
  /** Identity the destination checks it against (undefined for the source's sends: the source's own end-to-end check covers them). */
  identity?: string | undefined;
  /** Depth of the stack the sender sends (a backup server's merged stack; 1 for a source layer). */
  depth: number;
  dataBytes: number;
}

export interface Plan {
  strategy: SnapStrategy;
  flatten: boolean;
  sends: PlannedSend[];
  /** Bytes each sender is planned to move. */
  bytesBySender: Record<string, number>;
}

export interface PlanInput {
  strategy: SnapStrategy;
  chain: readonly ChainLayer[];
  index: SnapshotIndex;
  /** The destination keeps only the merged result (no snapshots). */
  flatten?: boolean;
  /** Identities of merged bottom stacks 0..top (only looked at with flatten). */
  prefixes?: readonly MergedPrefix[];
}

export const SOURCE = 'source';

/**
 * The plan. Deterministic: ties go to the server with fewer bytes planned so
 * far (paper 000's load balancing among backup servers), then by name.
 */
export function planMigration(p: PlanInput): Plan {
  const n = p.chain.length;
  if (n === 0) throw new Error('a chain has at least one layer');
  p.chain.forEach((l, i) => { if (l.index !== i) throw new Error(`chain layer ${i} says index ${l.index}`); });
  const flatten = p.strategy === 'selectivemig' ? true : !!p.flatten;
  const sends: PlannedSend[] = [];
  const load: Record<string, number> = {};
  const add = (s: PlannedSend) => { sends.push(s); load[s.sender] = (load[s.sender] ?? 0) + s.dataBytes; };
  const active = n - 1;
  if (p.strategy === 'selectivemig') {
    // The latest state only: the source sends the chain merged, snapshots dropped.
    add({ layers: p.chain.map((l) => l.index), sender: SOURCE, reason: 'latest-state', depth: n, dataBytes: p.chain.reduce((s, l) => s + l.dataBytes, 0) });
    return { strategy: p.strategy, flatten, sends, bytesBySender: load };
  }
  if (p.strategy === 'fullmig') {
    for (const l of p.chain) add({ layers: [l.index], sender: SOURCE, reason: l.index === active ? 'active' : 'miss', depth: 1, dataBytes: l.dataBytes });
    return { strategy: p.strategy, flatten, sends, bytesBySender: load };
  }
  const pick = (holders: readonly Holding[]): Holding | undefined =>
    [...holders].sort((a, b) => (load[a.server] ?? 0) - (load[b.server] ?? 0) || a.server.localeCompare(b.server))[0];
  // Per layer: a hit is its holder's, a miss the source's.
  const single = p.chain.slice(0, active).map((l) => pick(p.index.holders(l.identity)));
  const singleCost = (i: number) => p.chain[i]!.dataBytes;
  // Consolidation (flatten only): the bottom run 0..top merged, held by a server, when it moves fewer bytes.
  let start = 0;
  if (flatten) {
    let best: { prefix: MergedPrefix; holder: Holding; saved: number } | undefined;
    for (const prefix of p.prefixes ?? []) {
      if (prefix.top < 1 || prefix.top >= active) continue;
      const holder = pick(p.index.holders(prefix.identity));
      if (!holder) continue;
      let apart = 0;
      for (let i = 0; i <= prefix.top; i++) apart += singleCost(i);
      const saved = apart - prefix.dataBytes;
      if (saved > 0 && (!best || saved > best.saved)) best = { prefix, holder, saved };
    }
    if (best) {
      const layers = Array.from({ length: best.prefix.top + 1 }, (_, i) => i);
      add({ layers, sender: best.holder.server, reason: 'consolidated', identity: best.prefix.identity, depth: best.holder.depth, dataBytes: best.prefix.dataBytes });
      start = best.prefix.top + 1;
    }
  }
  for (let i = start; i < active; i++) {
    const l = p.chain[i]!;
    const h = single[i] && pick(p.index.holders(l.identity));
    if (h) add({ layers: [i], sender: h.server, reason: h.depth > 1 ? 'consolidated' : 'hit', identity: l.identity, depth: h.depth, dataBytes: l.dataBytes });
    else add({ layers: [i], sender: SOURCE, reason: 'miss', depth: 1, dataBytes: l.dataBytes });
  }
  add({ layers: [active], sender: SOURCE, reason: 'active', depth: 1, dataBytes: p.chain[active]!.dataBytes });
  return { strategy: p.strategy, flatten, sends, bytesBySender: load };
}

/** The plan again after servers went away: their sends become the source's, layer by layer (what a vanished backup server costs). */
export function replan(plan: Plan, gone: ReadonlySet<string>, chain: readonly ChainLayer[]): Plan {
  const sends = plan.sends.flatMap((s): PlannedSend[] => gone.has(s.sender)
    ? s.layers.map((i) => ({ layers: [i], sender: SOURCE, reason: 'miss' as const, depth: 1, dataBytes: chain[i]!.dataBytes }))
    : [s]);
  const load: Record<string, number> = {};
  for (const s of sends) load[s.sender] = (load[s.sender] ?? 0) + s.dataBytes;
  return { ...plan, sends, bytesBySender: load };
}
