// Text a peer chose (ERROR messages, image names, strategy strings) on its
// way into a log line: control characters escaped, length capped, so a peer
// can neither forge log lines nor flood them.

/** Longest piece of peer text kept in a log line, in characters. */
export const LOG_FIELD_MAX = 200;
/** Longest log line, in characters. */
export const LOG_LINE_MAX = 2000;

// C0, DEL, C1, and the Unicode line/paragraph separators and bidi overrides that reorder what a terminal shows.
const CONTROL = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/** s with every control character as \xNN or \uNNNN, cut to max characters (with a note of how many were cut). */
export function escapeForLog(s: string, max = LOG_FIELD_MAX): string {
  const escaped = s.replace(CONTROL, (c) => {
    const n = c.charCodeAt(0);
    return n < 0x100 ? `\\x${n.toString(16).padStart(2, '0')}` : `\\u${n.toString(16).padStart(4, '0')}`;
  });
  if (escaped.length <= max) return escaped;
  return `${escaped.slice(0, max)}…(${escaped.length - max} more)`;
}
