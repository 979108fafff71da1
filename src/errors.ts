/**
 * Errors with stable codes. Programs (and tests) branch on `code`, never on
 * the message; the message is built from the fields so that it states facts.
 * A code, once published, keeps its meaning forever.
 */
export const ErrorCode = {
  /** A function or CLI argument is out of its documented range or of the wrong type. */
  INVALID_ARGUMENT: 'ERR_BF_INVALID_ARGUMENT',
  /** A block size that is not a power of two in the supported range. */
  BAD_BLOCK_SIZE: 'ERR_BF_BAD_BLOCK_SIZE',
  /** WebAssembly memory cannot grow to what an operation needs (wasm32 stops at 4 GiB). */
  OUT_OF_MEMORY: 'ERR_BF_OUT_OF_MEMORY',
  /** The WASM core could not be loaded (missing build, or a corrupted file). */
  WASM_LOAD: 'ERR_BF_WASM_LOAD',
  /** A serialized file or buffer ends before its header or its declared content does. */
  TRUNCATED: 'ERR_BF_TRUNCATED',
  /** A serialized file does not start with the expected magic bytes. */
  BAD_MAGIC: 'ERR_BF_BAD_MAGIC',
  /** A serialized file has a format version this build cannot read. */
  UNSUPPORTED_VERSION: 'ERR_BF_UNSUPPORTED_VERSION',
  /** A serialized file's checksum does not match its content. */
  CHECKSUM_MISMATCH: 'ERR_BF_CHECKSUM_MISMATCH',
  /** A serialized file is well-framed but its content breaks an invariant. */
  CORRUPT: 'ERR_BF_CORRUPT',
  /** An image path that does not exist. */
  IMAGE_NOT_FOUND: 'ERR_BF_IMAGE_NOT_FOUND',
  /** An image path that is not a regular file or a block device (a directory, a socket, ...). */
  NOT_AN_IMAGE: 'ERR_BF_NOT_AN_IMAGE',
  /** An image that exists but cannot be opened or read (permissions, I/O error). */
  IMAGE_UNREADABLE: 'ERR_BF_IMAGE_UNREADABLE',
  /** An image changed while it was read (it shrank, or its identity changed). */
  IMAGE_CHANGED: 'ERR_BF_IMAGE_CHANGED',
  /** A block map that describes another version of its image (size or modification time differ). */
  STALE_BLOCK_MAP: 'ERR_BF_STALE_BLOCK_MAP',
  /** A file blockferry writes (block map, index) could not be written. */
  WRITE_FAILED: 'ERR_BF_WRITE_FAILED',
  /** A backend that was asked for (BLOCKFERRY_BACKEND=native) is not available. */
  BACKEND_UNAVAILABLE: 'ERR_BF_BACKEND_UNAVAILABLE',
  /** A system call failed (the native addon); the error carries errno and syscall. */
  SYSCALL: 'ERR_BF_SYSCALL',
  /** A peer broke the protocol: a malformed, oversized, truncated or unexpected frame. */
  PROTOCOL: 'ERR_BF_PROTOCOL',
  /** The peers speak different protocol versions. */
  PROTOCOL_VERSION: 'ERR_BF_PROTOCOL_VERSION',
  /** Authentication failed (wrong key, or one side insecure and the other not). */
  AUTH_FAILED: 'ERR_BF_AUTH_FAILED',
  /** The connection closed or failed before the exchange finished. */
  CONNECTION: 'ERR_BF_CONNECTION',
  /** The destination refused the migration (bad name, image exists, busy, ...); see `remoteCode`. */
  REFUSED: 'ERR_BF_REFUSED',
  /** The end-to-end check found blocks that differ and they could not be repaired. */
  VERIFY_FAILED: 'ERR_BF_VERIFY_FAILED',
  /** An image name that is not a plain file name inside the data directory. */
  NAME_INVALID: 'ERR_BF_NAME_INVALID',
  /** The destination already holds a complete image of that name (ask for --overwrite). */
  IMAGE_EXISTS: 'ERR_BF_IMAGE_EXISTS',
  /** Another migration into the same name is running. */
  BUSY: 'ERR_BF_BUSY',
  /** A command line that cannot be parsed (unknown option, missing argument). */
  USAGE: 'ERR_BF_USAGE',
  /** A file blockferry reads (block map, block index, journal) does not exist. */
  FILE_NOT_FOUND: 'ERR_BF_FILE_NOT_FOUND',
  /** A file blockferry reads exists but cannot be read. */
  FILE_UNREADABLE: 'ERR_BF_FILE_UNREADABLE',
  /** A bug in blockferry: a failure with no code of its own (please report it). */
  INTERNAL: 'ERR_BF_INTERNAL',
  /** The native addon failed inside (a Rust panic, caught at the boundary). */
  NATIVE_PANIC: 'ERR_BF_NATIVE_PANIC',
  /** Not enough disk space at the destination for the data that is arriving (ENOSPC, or the free-space check). */
  NO_SPACE: 'ERR_BF_NO_SPACE',
  /** An image larger than the destination accepts (its maxImageSize, --max-image-size). */
  IMAGE_TOO_LARGE: 'ERR_BF_IMAGE_TOO_LARGE',
  /** A peer sent nothing for longer than the idle deadline. */
  TIMEOUT: 'ERR_BF_TIMEOUT',
  /** The address to listen on is already taken by another socket. */
  ADDRESS_IN_USE: 'ERR_BF_ADDRESS_IN_USE',
  /** The address to listen on cannot be bound here (not an address of this host, not permitted, unknown name). */
  ADDRESS_UNAVAILABLE: 'ERR_BF_ADDRESS_UNAVAILABLE',
  /** The data directory cannot be created or written (a file, a read-only place, no permission). */
  DATA_DIR: 'ERR_BF_DATA_DIR',
  /** A path blockferry would write or read is a symbolic link (or not a regular file) where it must not be. */
  UNSAFE_PATH: 'ERR_BF_UNSAFE_PATH',
  /** A TLS certificate was refused: expired or not yet valid, for another name, signed by another CA, or missing. */
  TLS_CERT: 'ERR_BF_TLS_CERT',
  /** A connection was closed by the service's limits before authentication (handshake deadline, too many unauthenticated connections). */
  LIMIT: 'ERR_BF_LIMIT',
  /** An NBD server refused the negotiation (unknown export, missing option) or broke the NBD protocol, or answered a command with an error. */
  NBD: 'ERR_BF_NBD',
  /** QEMU's monitor (QMP) refused a command or could not be reached. */
  QMP: 'ERR_BF_QMP',
  /** Post-copy: the source went away before every block arrived; reads of the missing blocks fail until the migration is resumed. */
  SOURCE_GONE: 'ERR_BF_SOURCE_GONE',
  /** The caller cancelled the call (its AbortSignal fired); a migration's destination keeps what it has, and the same call again resumes. */
  ABORTED: 'ERR_BF_ABORTED',
  /** An image uses a format feature this build does not read (an encrypted or external-data qcow2, an unknown incompatible feature bit, a backing file of another format). */
  UNSUPPORTED_FEATURE: 'ERR_BF_UNSUPPORTED_FEATURE',
  /** A live migration's rounds could not bring the predicted downtime within its budget before the time limit (--on-stall wait). */
  NO_CONVERGENCE: 'ERR_BF_NO_CONVERGENCE',
  /** The fleet's location index (a Redis Cluster) could not be reached, or kept failing past its deadline (no failover completed), or holds another layout. */
  INDEX: 'ERR_BF_INDEX',
  /** SnapMig: a backup server was asked for a layer (by identity) it does not hold. */
  LAYER_NOT_HELD: 'ERR_BF_LAYER_NOT_HELD',
  /** SnapMig: a layer at the destination is not the layer its identity names (a backup server sent other content), or is not there. */
  LAYER_MISMATCH: 'ERR_BF_LAYER_MISMATCH',
  /** A content store's segment file (an intermediary's, a destination's stage) holds bytes that are not what they are stored under: the entry is dropped, never served. */
  STORE_CORRUPT: 'ERR_BF_STORE_CORRUPT',
} as const;

export type ErrorCodeValue = (typeof ErrorCode)[keyof typeof ErrorCode];

export class BlockferryError extends Error {
  readonly code: ErrorCodeValue;
  constructor(code: ErrorCodeValue, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

export class InvalidArgumentError extends BlockferryError {
  readonly argument: string;
  constructor(argument: string, expected: string, actual: unknown) {
    super(ErrorCode.INVALID_ARGUMENT, `${argument}: expected ${expected}, got ${describe(actual)}`);
    this.argument = argument;
  }
}

export class BlockSizeError extends BlockferryError {
  readonly blockSize: unknown;
  readonly min: number;
  readonly max: number;
  constructor(blockSize: unknown, min: number, max: number) {
    super(ErrorCode.BAD_BLOCK_SIZE, `block size must be a power of two from ${min} to ${max} bytes, got ${describe(blockSize)}`);
    this.blockSize = blockSize;
    this.min = min;
    this.max = max;
  }
}

export class OutOfMemoryError extends BlockferryError {
  readonly requested: number;
  readonly available: number;
  constructor(requested: number, available: number) {
    super(
      ErrorCode.OUT_OF_MEMORY,
      `WebAssembly memory cannot grow to ${requested} bytes (at most ${available}); stream the data through a smaller window`,
    );
    this.requested = requested;
    this.available = available;
  }
}

/** An image that cannot be used; `path` says which. */
export class ImageError extends BlockferryError {
  readonly path: string;
  constructor(code: ErrorCodeValue, path: string, detail: string, options?: { cause?: unknown }) {
    super(code, `${path}: ${detail}`, options);
    this.path = path;
  }
}

/** A serialized structure (block index, block map, ...) that cannot be read. */
export class FormatError extends BlockferryError {
  /** What was being read, e.g. "block index". */
  readonly what: string;
  constructor(code: ErrorCodeValue, what: string, detail: string) {
    super(code, `${what}: ${detail}`);
    this.what = what;
  }
}

function describe(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'bigint') return `${v}n`;
  if (v === null || typeof v !== 'object') return String(v);
  return Object.prototype.toString.call(v);
}

/** An error in the exchange with a peer; `remoteCode` is the peer's code when it sent one. */
export class ProtocolError extends BlockferryError {
  readonly remoteCode: string | undefined;
  constructor(code: ErrorCodeValue, message: string, remoteCode?: string, options?: { cause?: unknown }) {
    super(code, message, options);
    this.remoteCode = remoteCode;
  }
}

/** A call cancelled through its AbortSignal; `reason` is the signal's. */
export class AbortError extends BlockferryError {
  readonly reason: unknown;
  constructor(what: string, reason: unknown) {
    const why = reason instanceof Error ? reason.message : reason === undefined ? 'aborted' : String(reason);
    super(ErrorCode.ABORTED, `${what} cancelled: ${why}`, { cause: reason });
    this.reason = reason;
  }
}

/** Throws the AbortError of a signal that has fired. */
export function checkAborted(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) throw new AbortError(what, signal.reason);
}

/** Whether a failure is a full disk or quota (ENOSPC, EDQUOT), itself or anywhere in its cause chain. */
export function isNoSpace(e: unknown): boolean {
  for (let x = e as { code?: unknown; cause?: unknown } | undefined, i = 0; x && i < 8; x = x.cause as typeof x, i++) {
    if (x.code === 'ENOSPC' || x.code === 'EDQUOT' || x.code === ErrorCode.NO_SPACE) return true;
  }
  return false;
}
