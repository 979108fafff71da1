// The NBD protocol's numbers and fixed-size headers, shared by the client
// (blockferry reads what QEMU exports) and the server (the destination serves
// an image while it arrives). From the protocol specification, doc/proto.md
// of the NBD project: fixed newstyle negotiation, structured replies, block
// status with metadata contexts. Extended headers are not used.

/** "NBDMAGIC": the server's first eight bytes. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": newstyle negotiation, and the magic of every option request. */
export const NBD_IHAVEOPT = 0x49484156454f5054n;
/** Oldstyle negotiation's second magic: a server that offers no options (not supported). */
export const NBD_OLDSTYLE_MAGIC = 0x00420281861253n;
/** The magic of every option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

/** Transmission flags of an export. */
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

/** Options (haggling phase). */
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

/** Option replies; the error replies have bit 31 set. */
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3;
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6;
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9;

/** The name of an option error reply, for messages. */
export function nbdRepErrorName(type: number): string {
  const names = ['', 'NBD_REP_ERR_UNSUP', 'NBD_REP_ERR_POLICY', 'NBD_REP_ERR_INVALID', 'NBD_REP_ERR_PLATFORM', 'NBD_REP_ERR_TLS_REQD',
    'NBD_REP_ERR_UNKNOWN', 'NBD_REP_ERR_SHUTDOWN', 'NBD_REP_ERR_BLOCK_SIZE_REQD', 'NBD_REP_ERR_TOO_BIG'];
  return names[(type & ~NBD_REP_FLAG_ERROR) >>> 0] || `error reply 0x${(type >>> 0).toString(16)}`;
}

/** NBD_REP_INFO types (NBD_OPT_INFO and NBD_OPT_GO). */
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

/** Commands (transmission phase). */
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

/** Command flags. */
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

/** Structured reply chunks. */
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) | 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2;

/** Error values on the wire (Linux errno numbers, as the specification fixes them). */
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** The name of a wire error value, for messages. */
export function nbdErrnoName(errno: number): string {
  const names: Record<number, string> = {
    [NBD_EPERM]: 'EPERM', [NBD_EIO]: 'EIO', [NBD_ENOMEM]: 'ENOMEM', [NBD_EINVAL]: 'EINVAL', [NBD_ENOSPC]: 'ENOSPC',
    [NBD_EOVERFLOW]: 'EOVERFLOW', [NBD_ENOTSUP]: 'ENOTSUP', [NBD_ESHUTDOWN]: 'ESHUTDOWN',
  };
  return names[errno] ?? `error ${errno}`;
}

/** Metadata contexts. */
export const BASE_ALLOCATION = 'base:allocation';
/** base:allocation status flags. */
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
/** The prefix of QEMU's dirty-bitmap contexts, and its one flag. */
export const QEMU_DIRTY_BITMAP = 'qemu:dirty-bitmap:';
export const NBD_STATE_DIRTY = 1 << 0;

/** Sizes of the fixed headers. */
export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const STRUCTURED_REPLY_HEADER_BYTES = 20;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;

/** Longest name (export, metadata context) either side accepts: the specification's 4096 bytes. */
export const NBD_MAX_STRING = 4096;
/** Largest READ or WRITE payload served or asked for: 32 MiB (QEMU's own limit). */
export const NBD_MAX_PAYLOAD = 32 << 20;

/** Option replies: NBD_REP_INFO payload sizes (the info type included). */
export const INFO_EXPORT_BYTES = 12;
export const INFO_BLOCK_SIZE_BYTES = 14;
/** What NBD_OPT_EXPORT_NAME's reply pads with unless the client set NBD_FLAG_C_NO_ZEROES. */
export const EXPORT_NAME_ZEROES = 124;

export interface NbdRequest {
  flags: number;
  type: number;
  /** The client's opaque handle, echoed in the reply (a bigint: all 64 bits matter). */
  cookie: bigint;
  offset: number;
  length: number;
}

export function encodeRequest(r: NbdRequest, out = Buffer.allocUnsafe(REQUEST_HEADER_BYTES)): Buffer {
  out.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  out.writeUInt16BE(r.flags, 4);
  out.writeUInt16BE(r.type, 6);
  out.writeBigUInt64BE(r.cookie, 8);
  out.writeBigUInt64BE(BigInt(r.offset), 16);
  out.writeUInt32BE(r.length, 24);
  return out;
}

/** A request header; undefined when the magic is wrong (the caller closes the connection). */
export function decodeRequest(b: Buffer): NbdRequest | undefined {
  if (b.length < REQUEST_HEADER_BYTES || b.readUInt32BE(0) !== NBD_REQUEST_MAGIC) return undefined;
  const offset = b.readBigUInt64BE(16);
  return {
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    cookie: b.readBigUInt64BE(8),
    offset: offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offset),
    length: b.readUInt32BE(24),
  };
}

export function encodeSimpleReply(cookie: bigint, error: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

export function encodeOptionReply(option: number, type: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES);
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(length, 16);
  return b;
}

export function encodeChunkHeader(cookie: bigint, flags: number, type: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/** An extent of a metadata context: its length and its status flags. */
export interface StatusExtent {
  length: number;
  flags: number;
}

/**
 * What an NBD server serves: the operations of one export. The server owns
 * the protocol (negotiation, framing, bounds, flags); an export owns the
 * bytes. A method that throws an `NbdExportError` answers with that errno; any
 * other error answers EIO. Operations an export lacks are not advertised.
 */
export interface NbdExport {
  readonly name: string;
  readonly size: number;
  readonly description?: string;
  /** No WRITE, TRIM or WRITE_ZEROES. */
  readonly readOnly: boolean;
  /** Reads [offset, offset + length). May wait (a block still arriving). */
  read(offset: number, length: number): Promise<Uint8Array>;
  write?(offset: number, data: Uint8Array, fua: boolean): Promise<void>;
  /**
   * WRITE_ZEROES; `punch` when the client allows a hole (no NBD_CMD_FLAG_NO_HOLE).
   * `fast` (NBD_CMD_FLAG_FAST_ZERO): zero only if that is faster than writing
   * zeros would be, else throw `NbdExportError(NBD_ENOTSUP)` without touching
   * the range. Only passed to an export that declares `fastZero`.
   */
  zero?(offset: number, length: number, punch: boolean, fua: boolean, fast?: boolean): Promise<void>;
  /** zero() understands `fast`: the server advertises NBD_FLAG_SEND_FAST_ZERO (without it, FAST_ZERO requests fail with ENOTSUP). */
  readonly fastZero?: boolean;
  trim?(offset: number, length: number): Promise<void>;
  flush?(): Promise<void>;
  /** base:allocation extents from offset, covering at least one byte and at most length (HOLE and ZERO flags). */
  allocation(offset: number, length: number): Promise<StatusExtent[]>;
}

/** An export's answer to one command: an NBD errno and a message for the server's log. */
export class NbdExportError extends Error {
  constructor(readonly errno: number, message: string) {
    super(message);
    this.name = 'NbdExportError';
  }
}
