// A real Redis Cluster for tests and benches: six `redis-server` processes on
// loopback (three masters, three replicas), each in its own temp dir, joined
// by `redis-cli --cluster create`. Ports come from a range the caller owns
// (BF_REDIS_PORTS, default 17000-17099) and are checked free, with their
// cluster bus port (+10000), before use. `stop()` kills every process it
// started (by PID) and removes the dirs.
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface RedisNode {
  port: number;
  proc: ChildProcess;
  dir: string;
}

export interface RedisCluster {
  /** `redis://127.0.0.1:P1,127.0.0.1:P2,...` (all six, masters and replicas). */
  url: string;
  nodes: RedisNode[];
  /** `redis-cli -p PORT ARGS...`, stdout. */
  cli(port: number, ...args: string[]): Promise<string>;
  /** Ports of the nodes that are masters now and not failed. */
  masters(): Promise<number[]>;
  /** SIGKILL one node (a master, for a failover test). */
  kill(port: number): void;
  /** Waits until every live node reports cluster_state:ok and every master has its slots. */
  waitHealthy(timeoutMs?: number): Promise<void>;
  stop(): Promise<void>;
}

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen({ port, host: '127.0.0.1', exclusive: true }, () => s.close(() => resolve(true)));
  });
}

/** n ports of the range (and their bus ports, +10000) that nothing listens on now. */
export async function freePorts(n: number): Promise<number[]> {
  const [lo, hi] = (process.env.BF_REDIS_PORTS ?? '17000-17099').split('-').map(Number) as [number, number];
  const span = hi - lo + 1;
  const start = Math.floor(Math.random() * span);
  const out: number[] = [];
  for (let i = 0; i < span && out.length < n; i++) {
    const p = lo + ((start + i) % span);
    if ((await portFree(p)) && (await portFree(p + 10000))) out.push(p);
  }
  if (out.length < n) throw new Error(`no ${n} free ports in ${lo}-${hi}`);
  return out;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Starts a 3-master, 3-replica cluster (cluster-node-timeout 2000 ms: a killed master fails over in a few seconds, and a loaded 2-core machine does not make healthy nodes look dead). */
export async function startRedisCluster(opts: { prefix?: string; /** A command prefix that runs redis-server and redis-cli elsewhere: ['ip', 'netns', 'exec', NS]. */ exec?: string[] } = {}): Promise<RedisCluster> {
  const pre = opts.exec ?? [];
  const cmd = (c: string, args: string[]): [string, string[]] => (pre.length ? [pre[0]!, [...pre.slice(1), c, ...args]] : [c, args]);
  if (pre.length) await run(...cmd('ip', ['link', 'set', 'lo', 'up']));
  const root = mkdtempSync(join(tmpdir(), `${opts.prefix ?? 'bfC'}-redis-`));
  const ports = await freePorts(6);
  const nodes: RedisNode[] = [];
  const cli = async (port: number, ...args: string[]) => (await run(...cmd('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...args]))).stdout;
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    for (const n of nodes) {
      if (n.proc.exitCode === null && n.proc.signalCode === null) {
        const gone = new Promise((r) => n.proc.once('exit', r));
        n.proc.kill('SIGKILL');
        await gone;
      }
    }
    rmSync(root, { recursive: true, force: true });
  };
  try {
    for (const port of ports) {
      const dir = join(root, String(port));
      mkdirSync(dir);
      // No RDB/AOF: an acknowledged record's durability is its replica (WAIT), which is what the tests check.
      const proc = spawn(...cmd('redis-server', [
        '--port', String(port), '--bind', '127.0.0.1', '--dir', dir,
        '--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf', '--cluster-node-timeout', '2000',
        '--save', '', '--appendonly', 'no', '--logfile', join(dir, 'redis.log'),
      ]), { stdio: 'ignore' });
      nodes.push({ port, proc, dir });
    }
    for (const n of nodes) {
      for (let i = 0; ; i++) {
        try {
          if ((await cli(n.port, 'ping')).trim() === 'PONG') break;
        } catch { /* not up yet */ }
        if (n.proc.exitCode !== null || i > 200) throw new Error(`redis-server on ${n.port} did not start (see ${n.dir}/redis.log)`);
        await sleep(25);
      }
    }
    await run(...cmd('redis-cli', ['--cluster', 'create', ...ports.map((p) => `127.0.0.1:${p}`), '--cluster-replicas', '1', '--cluster-yes']));
    const cluster: RedisCluster = {
      url: `redis://${ports.map((p) => `127.0.0.1:${p}`).join(',')}`,
      nodes,
      cli,
      async masters() {
        const out = await cli(nodes.find((n) => n.proc.exitCode === null && n.proc.signalCode === null)!.port, 'cluster', 'nodes');
        // <id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
        return out.split('\n').map((l) => l.split(' ')).filter((f) => {
          const flags = (f[2] ?? '').split(',');
          return flags.includes('master') && !flags.includes('fail') && !flags.includes('fail?') && f.length > 8;
        }).map((f) => Number(f[1]!.split('@')[0]!.split(':').pop()));
      },
      kill(port: number) {
        nodes.find((n) => n.port === port)!.proc.kill('SIGKILL');
      },
      async waitHealthy(timeoutMs = 30_000) {
        const until = Date.now() + timeoutMs;
        for (;;) {
          let ok = true;
          try {
            for (const n of nodes) {
              if (n.proc.exitCode !== null || n.proc.signalCode !== null) continue;
              const info = await cli(n.port, 'cluster', 'info');
              if (!/cluster_state:ok/.test(info) || !/cluster_slots_ok:16384/.test(info)) ok = false;
              const repl = await cli(n.port, 'info', 'replication');
              if (/role:slave/.test(repl) && !/master_link_status:up/.test(repl)) ok = false;
            }
            if (ok && (await cluster.masters()).length < 3) ok = false;
          } catch {
            ok = false;
          }
          if (ok) return;
          if (Date.now() > until) throw new Error('the Redis Cluster did not become healthy');
          await sleep(100);
        }
      },
      stop,
    };
    await cluster.waitHealthy();
    return cluster;
  } catch (e) {
    await stop();
    throw e;
  }
}
