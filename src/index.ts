// blockferry's public API. Everything the CLI does goes through these exports.
export {
  Engine,
  checkBlockSize,
  blockCount,
  MIN_BLOCK_SIZE,
  MAX_BLOCK_SIZE,
  DIGEST_BYTES,
  type Region,
  type EngineOptions,
} from './engine/engine.js';
export { wasmModule, instantiateCore, type WasmCore } from './engine/wasm.js';
export { Bitmap, MAX_BITS, type Run } from './bitmap/bitmap.js';
export {
  BlockIndexTable,
  makeRef,
  refImage,
  refBlock,
  NO_REF,
  MAX_IMAGE_ID,
  MAX_BLOCK_NUMBER,
  ENTRY_BYTES,
  MAX_LOAD,
  type TableStats,
} from './table/table.js';
export {
  BlockferryError,
  InvalidArgumentError,
  BlockSizeError,
  OutOfMemoryError,
  FormatError,
  ErrorCode,
  type ErrorCodeValue,
} from './errors.js';
export { ImageError } from './errors.js';
export { FileImageSource, openSource, statImage, currentIdentity, type ImageSource, type SourceSpec, type Extent, type ImageIdentity } from './image/source.js';
export { Scanner, blockMapsFor, DEFAULT_RANGE, type ScanOptions, type ScannerOptions, type ScanProgress, type MapOptions, type MapResult } from './scan/scanner.js';
export { BlockMap, blockMapPath, checkDataRuns, BLOCKMAP_VERSION, type BlockMapStats, type DataRun } from './blockmap/blockmap.js';
// Block maps are a cache keyed by image identity, never written beside an image (blockmap/cache.ts).
export { MapCache, defaultCacheDir, DEFAULT_CACHE_MAX_BYTES, type MapCacheOptions, type CacheInfo, type CacheKey, type CachedKind } from './blockmap/cache.js';
export { FileFormat, TRAILER_BYTES } from './io/format.js';
export { blockLength, intervalBytes, consecutiveRuns, split, IntervalSet, type Interval } from './blocks/intervals.js';
export { TreeChecksum, treeChecksum, CHECKSUM_PIECE } from './engine/checksum.js';
export { similarityMatrix, type SimilarityMatrix, type SimilarityImage } from './similarity/similarity.js';
export { Neighbourhood, type NeighbourImage, type BlockLocation } from './blockindex/neighbourhood.js';
export { DestinationService, type DestinationOptions, type SessionStats } from './roles/destination/service.js';
export { RepositoryService, type RepositoryOptions } from './roles/repository/service.js';
// Scatter-gather (paper 003): the intermediary role, its content store, and the eviction of several images.
export { IntermediaryService, type IntermediaryOptions, type StoreStats } from './roles/intermediary/service.js';
export { ContentStore, type StoreOptions } from './roles/intermediary/store.js';
export { scatterGather, SCATTER_INFO_BATCH, type ScatterGatherOptions, type ScatterGatherResult, type ScatterGatherImage, type LinkBytes } from './migrate/scatter-gather.js';
export { migrate, type MigrateOptions, type MigrationResult, type Strategy } from './migrate/migrate.js';
export { STRATEGIES } from './migrate/strategies.js';
export type { Strategy as MigrationStrategy, MigrationContext, StrategyOutcome, MigrationEvent, MigrationProgress, LiveOptions, LiveReport, DeltaReport } from './migrate/strategy.js';
export { DEFAULT_MAX_DOWNTIME_MS, DEFAULT_STALL_TIMEOUT_MS, type StallPolicy, type SendOrder, type CutoverReason, type ThrottleInfo, type StallReport, type ThrottleReport } from './migrate/live.js';
export { FileImageSink, type ImageSink } from './image/sink.js';
export { Qcow2ImageSink, type Qcow2SinkOptions } from './image/qcow2-writer.js';
export { PROTOCOL_VERSION } from './protocol/messages.js';
export type { CompressMode } from './protocol/compression.js';
export { TrackedImage } from './image/tracked.js';
export { specFor, sourceIdentity, sourceSize, sourceName, type ImageFormat } from './image/source.js';
export { Qcow2ImageSource, isQcow2File, MAX_CHAIN_DEPTH, type LayerInfo, type LayerRun, type RunKind } from './image/qcow2.js';
export { NbdImageSource } from './image/nbd.js';
export { NbdClient, type NbdClientOptions, type NbdExtent } from './nbd/client.js';
export { parseNbdUri, formatNbdUri, isUri, NBD_DEFAULT_PORT, type NbdTarget } from './nbd/uri.js';
export { QmpClient } from './nbd/qmp.js';
export { QmpDirty, type DirtySource } from './migrate/rounds.js';
export { ProtocolError } from './errors.js';
export { chooseBackend, nativeStatus, type BackendName, type BackendChoice } from './engine/backend.js';
export type { AuthOptions } from './protocol/handshake.js';
export type { TlsOptions } from './transport/tls.js';
export type { Traffic, TrafficKind } from './protocol/channel.js';
export { NbdServer, nbdUri, type NbdServerOptions, type NbdExports, type NbdAddress } from './nbd/server.js';
export { FileExport, type FileExportOptions } from './nbd/file-export.js';
export { NbdExportError, type NbdExport, type StatusExtent } from './nbd/protocol.js';
export { progressOf, type Progress, type ProgressRun, type Operation, type Phase } from './progress.js';
export { textLogger, memoryLogger, nullLogger, LOG_LEVELS, type Logger, type LogFn, type LogFields, type LogLevel, type LogEntry } from './log.js';
export { mapsOfImages, type ImagesOptions } from './scan/maps.js';
export { similarity } from './similarity/images.js';
export { buildIndex, type IndexOptions } from './blockindex/build.js';
// Pages a person looks at (issue 14): similarity heatmaps and the migration report, self-contained HTML.
export { similarityPage, migrationReport, timelineRounds, TimelineRecorder, DEFAULT_SAMPLE_MS, writePage, PAGE_CSP, type SimilarityPageOptions, type MigrationReportOptions, type ReportRound, type Timeline, type TimelineEvent, type TimelineSample, type RecordableOptions } from './report/index.js';
// The fleet's location index (issue 12): embedded by default, Redis Cluster for redis://HOST:PORT
// (src/fleet/redis-index.ts, loaded on demand: importing blockferry never loads ioredis).
export { EmbeddedLocationIndex, type LocationIndex } from './fleet/location-index.js';
export { openLocationIndex } from './fleet/open.js';
export type { RedisIndexOptions } from './fleet/location-index.js';
export type { RedisLocationIndex } from './fleet/redis-index.js';
// SnapMig (paper 000): backup servers send the base and older snapshots, the source only its newest changes.
export { BackupService, type BackupOptions } from './roles/backup/service.js';
export { migrateChain, chainFiles, type ChainMigrateOptions, type ChainMigrationResult, type LayerSendReport } from './snapmig/migrate-chain.js';
export { planMigration, replan, SnapshotIndex, SNAP_STRATEGIES, type SnapStrategy, type Plan, type PlannedSend, type ChainLayer, type Holding, type MergedPrefix } from './snapmig/plan.js';
export { layerIdentity, stackMap, digestLayer, IDENTITY_BLOCK, type LayerIdentity, type StackMap } from './snapmig/identity.js';
export { LAYER_SINKS, chainSink, flatSink, qcow2ChainSink, qcow2ChainFiles, copyCovered, type LayerSink, type LayerSinkContext, type LayerSinkFactory, type ReceivedLayer } from './roles/destination/chain.js';
