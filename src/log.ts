// Logging for the long-running services (destination, repository, NBD
// server). A service logs events with a level, a sentence for people and
// fields for programs: `logger.info({ image, peer, bytes }, 'migration
// complete')`. The Logger shape is pino's, so an embedding program passes
// its own pino logger (or anything with the same four methods and child);
// the CLI uses pino for `serve --log-format json` and a one-line text form
// otherwise.
//
// Peers choose some of what is logged (image names, error messages), so
// every string, the sentence and each field, goes through escapeForLog on
// its way in (`guarded`): no control characters (no forged lines, no
// terminal escapes), bounded length (no flooding), whatever the logger.
import { escapeForLog, LOG_FIELD_MAX, LOG_LINE_MAX } from './util/sanitize.js';

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export const LOG_LEVELS: readonly LogLevel[] = ['debug', 'info', 'warn', 'error'];

export type LogFields = Record<string, unknown>;

/** One method of a Logger: fields then a sentence, or a sentence alone (pino's LogFn). */
export interface LogFn {
  (fields: LogFields, msg?: string): void;
  (msg: string): void;
}

/** What a service logs to: pino's shape (a pino logger is one). */
export interface Logger {
  debug: LogFn;
  info: LogFn;
  warn: LogFn;
  error: LogFn;
  /** A logger that adds these fields to every entry. */
  child(bindings: LogFields): Logger;
}

type Sink = (level: LogLevel, fields: LogFields, msg: string) => void;

function fromSink(sink: Sink, bindings: LogFields = {}): Logger {
  const at = (level: LogLevel): LogFn =>
    ((a: LogFields | string, b?: string) => (typeof a === 'string' ? sink(level, bindings, a) : sink(level, { ...bindings, ...a }, b ?? ''))) as LogFn;
  return { debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error'), child: (more) => fromSink(sink, { ...bindings, ...more }) };
}

/** Discards everything. */
export const nullLogger: Logger = fromSink(() => {});

/**
 * Lines of text (the sentence only: the fields repeat it for programs),
 * at `level` and above, to write(line). The form `serve` printed before
 * structured logging, and the adapter for the older `log: (line) => void`
 * option.
 */
export function textLogger(write: (line: string) => void, level: LogLevel = 'info'): Logger {
  const min = LOG_LEVELS.indexOf(level);
  return fromSink((l, _fields, msg) => {
    if (LOG_LEVELS.indexOf(l) >= min) write(l === 'info' || l === 'debug' ? msg : `${l === 'warn' ? 'warning' : l}: ${msg}`);
  });
}

/** Records every entry (tests, and programs that collect a service's log). */
export interface LogEntry {
  level: LogLevel;
  msg: string;
  fields: LogFields;
}
export function memoryLogger(into: LogEntry[]): Logger {
  return fromSink((level, fields, msg) => into.push({ level, msg, fields }));
}

function clean(v: unknown, depth = 0): unknown {
  if (typeof v === 'string') return escapeForLog(v, LOG_FIELD_MAX);
  if (v instanceof Error) return { code: (v as { code?: unknown }).code, message: escapeForLog(v.message, LOG_FIELD_MAX) };
  if (v === null || typeof v !== 'object' || depth > 3) return v;
  if (Array.isArray(v)) return v.slice(0, 64).map((x) => clean(x, depth + 1));
  const out: LogFields = {};
  for (const [k, x] of Object.entries(v)) out[escapeForLog(k, 64)] = clean(x, depth + 1);
  return out;
}

/** logger with every string it is given escaped and capped (see the top of this file). */
export function guarded(logger: Logger): Logger {
  const at = (f: LogFn): LogFn =>
    ((a: LogFields | string, b?: string) => {
      if (typeof a === 'string') f(escapeForLog(a, LOG_LINE_MAX));
      else f(clean(a) as LogFields, escapeForLog(b ?? '', LOG_LINE_MAX));
    }) as LogFn;
  return {
    debug: at(logger.debug.bind(logger)),
    info: at(logger.info.bind(logger)),
    warn: at(logger.warn.bind(logger)),
    error: at(logger.error.bind(logger)),
    child: (b) => guarded(logger.child(clean(b) as LogFields)),
  };
}

/** The logger a service uses: options.logger, else options.log (lines), else none; guarded either way. */
export function serviceLogger(options: { logger?: Logger; log?: (line: string) => void }, bindings: LogFields): Logger {
  const base = options.logger ?? (options.log ? textLogger(options.log, 'debug') : nullLogger);
  return guarded(base.child(bindings));
}
