// Three hosts for SnapMig (paper 000): the source, a backup server and the
// destination, each a Linux network namespace. The source and the backup
// server each have their own veth to the destination (each shaped with tbf
// on the sender's side: the source's uplink, the backup server's uplink)
// and one between them for the coordinator's requests. Every host reaches
// the destination at one address (the backup server through a route over
// its own link). Needs root and iproute2; returns undefined (and leaves
// nothing behind) where the machine will not.
import { spawnSync } from 'node:child_process';

const sh = (a: string[]) => spawnSync(a[0]!, a.slice(1), { stdio: 'ignore' }).status === 0;

export interface SnapHosts {
  SRC: string; BAK: string; DST: string;
  /** Command prefixes that run a program on each host. */
  inSrc: string[]; inBak: string[]; inDst: string[];
  /** The destination's address (from every host), the backup server's (from the source). */
  dst: string; bak: string;
  /** tbf on the sender's side of the source→destination and backup→destination links. */
  shapeSource(rate: string): boolean;
  shapeBackup(rate: string): boolean;
  /** Bytes sent so far on each link, by the side named first (tx counters of its veth, headers included). */
  bytes(): { srcToDst: number; dstToSrc: number; bakToDst: number; dstToBak: number; srcToBak: number; bakToSrc: number };
  drop(): void;
}

/** prefix: the caller's unique prefix (3 characters); octet: 10.OCTET.x.y subnets for its links. */
export function snapHosts(prefix: string, octet: number): SnapHosts | undefined {
  const tag = `${process.pid % 100000}`;
  const SRC = `${prefix}src${tag}`, BAK = `${prefix}bak${tag}`, DST = `${prefix}dst${tag}`;
  const v = (a: string) => `${prefix}${a}${tag}`;
  const t = (process.pid % 80) * 3;
  const nets = [`10.${octet}.${t}`, `10.${octet}.${t + 1}`, `10.${octet}.${t + 2}`]; // src-dst, bak-dst, src-bak
  const drop = () => { for (const n of [SRC, BAK, DST]) sh(['ip', 'netns', 'del', n]); };
  const pair = (a: string, va: string, b: string, vb: string, net: string) =>
    sh(['ip', 'link', 'add', va, 'netns', a, 'type', 'veth', 'peer', 'name', vb, 'netns', b]) &&
    sh(['ip', '-n', a, 'addr', 'add', `${net}.1/24`, 'dev', va]) && sh(['ip', '-n', b, 'addr', 'add', `${net}.2/24`, 'dev', vb]) &&
    sh(['ip', '-n', a, 'link', 'set', va, 'up']) && sh(['ip', '-n', b, 'link', 'set', vb, 'up']);
  const ok = process.getuid?.() === 0 && sh(['ip', 'netns', 'add', SRC]) && sh(['ip', 'netns', 'add', BAK]) && sh(['ip', 'netns', 'add', DST]) &&
    [SRC, BAK, DST].every((n) => sh(['ip', '-n', n, 'link', 'set', 'lo', 'up'])) &&
    pair(SRC, v('sd'), DST, v('ds'), nets[0]!) && pair(BAK, v('bd'), DST, v('db'), nets[1]!) && pair(SRC, v('sb'), BAK, v('bs'), nets[2]!) &&
    // The backup server reaches the destination's address on the source's link through its own link.
    sh(['ip', '-n', BAK, 'route', 'add', `${nets[0]}.0/24`, 'via', `${nets[1]}.2`]);
  if (!ok) { drop(); return undefined; }
  const ex = (n: string) => ['ip', 'netns', 'exec', n];
  const shape = (ns: string, dev: string, rate: string) => sh([...ex(ns), 'tc', 'qdisc', 'replace', 'dev', dev, 'root', 'tbf', 'rate', rate, 'burst', rate.endsWith('gbit') ? '1mb' : '256kb', 'latency', '200ms']);
  const tx = (ns: string, dev: string) => {
    const r = spawnSync('ip', ['netns', 'exec', ns, 'cat', `/sys/class/net/${dev}/statistics/tx_bytes`], { encoding: 'utf8' });
    const n = Number((r.stdout ?? '').trim());
    if (!Number.isFinite(n)) throw new Error(`veth counter ${dev}: ${r.stderr}`);
    return n;
  };
  return {
    SRC, BAK, DST, inSrc: ex(SRC), inBak: ex(BAK), inDst: ex(DST), dst: `${nets[0]}.2`, bak: `${nets[2]}.2`, drop,
    shapeSource: (rate) => shape(SRC, v('sd'), rate),
    shapeBackup: (rate) => shape(BAK, v('bd'), rate),
    bytes: () => ({
      srcToDst: tx(SRC, v('sd')), dstToSrc: tx(DST, v('ds')), bakToDst: tx(BAK, v('bd')), dstToBak: tx(DST, v('db')), srcToBak: tx(SRC, v('sb')), bakToSrc: tx(BAK, v('bs')),
    }),
  };
}
