// Two hosts for benches: Linux network namespaces joined by a veth pair, the
// source's side shaped with tbf. Needs root and iproute2; returns undefined
// (and leaves nothing behind) where the machine will not.
import { spawnSync } from 'node:child_process';

const sh = (a: string[]) => spawnSync(a[0]!, a.slice(1), { stdio: 'ignore' }).status === 0;

export interface Hosts {
  SRC: string;
  DST: string;
  /** The source's veth (its counters see everything that crossed the link). */
  VS: string;
  /** Command prefixes that run a program on either host. */
  inSrc: string[];
  inDst: string[];
  /** The destination's address, seen from the source. */
  host: string;
  /** Sets the link's rate (tbf on the source's side). */
  shape(rate: string, burst: string): boolean;
  /** Bytes that crossed the veth so far, both directions, headers included. */
  bytes(): number;
  drop(): void;
}

export function twoHosts(prefix: string, octet: number): Hosts | undefined {
  const tag = `${process.pid % 100000}`;
  const SRC = `${prefix}s${tag}`, DST = `${prefix}d${tag}`, VS = `${prefix}vs${tag}`, VD = `${prefix}vd${tag}`;
  const net = `10.${octet}.${process.pid % 250}`;
  const drop = () => { sh(['ip', 'netns', 'del', SRC]); sh(['ip', 'netns', 'del', DST]); };
  const ok = process.getuid?.() === 0 && sh(['ip', 'netns', 'add', SRC]) && sh(['ip', 'netns', 'add', DST]) &&
    sh(['ip', 'link', 'add', VS, 'netns', SRC, 'type', 'veth', 'peer', 'name', VD, 'netns', DST]) &&
    sh(['ip', '-n', SRC, 'addr', 'add', `${net}.1/24`, 'dev', VS]) && sh(['ip', '-n', DST, 'addr', 'add', `${net}.2/24`, 'dev', VD]) &&
    sh(['ip', '-n', SRC, 'link', 'set', VS, 'up']) && sh(['ip', '-n', DST, 'link', 'set', VD, 'up']) &&
    sh(['ip', '-n', SRC, 'link', 'set', 'lo', 'up']) && sh(['ip', '-n', DST, 'link', 'set', 'lo', 'up']);
  if (!ok) { drop(); return undefined; }
  const inSrc = ['ip', 'netns', 'exec', SRC];
  return {
    SRC, DST, VS, inSrc, inDst: ['ip', 'netns', 'exec', DST], host: `${net}.2`, drop,
    shape: (rate, burst) => sh([...inSrc, 'tc', 'qdisc', 'replace', 'dev', VS, 'root', 'tbf', 'rate', rate, 'burst', burst, 'latency', '200ms']),
    bytes: () => {
      const r = spawnSync(inSrc[0]!, [...inSrc.slice(1), 'cat', `/sys/class/net/${VS}/statistics/tx_bytes`, `/sys/class/net/${VS}/statistics/rx_bytes`], { encoding: 'utf8' });
      const [tx, rx] = (r.stdout ?? '').trim().split(/\s+/).map(Number);
      if (!Number.isFinite(tx) || !Number.isFinite(rx)) throw new Error(`veth counters: ${r.stderr}`);
      return tx! + rx!;
    },
  };
}
