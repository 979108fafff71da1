// The services' log on stderr: pino's JSON lines (`--log-format json`, for
// journald, Loki, jq) or one line of text per entry (the default).
import { hostname } from 'node:os';
import { textLogger, type Logger, type LogLevel } from '../log.js';

export type LogFormat = 'text' | 'json';

export async function cliLogger(format: LogFormat, level: LogLevel, prefix: string): Promise<Logger> {
  if (format === 'text') return textLogger((l) => process.stderr.write(`${prefix}: ${l}\n`), level);
  // pino is loaded only here: every other command starts without it.
  const { pino } = await import('pino');
  // Synchronous writes: a service stopped by a signal loses no line it logged.
  const logger: Logger = pino({ name: 'blockferry', level, base: { pid: process.pid, hostname: hostname() } }, pino.destination({ dest: 2, sync: true }));
  return logger;
}
