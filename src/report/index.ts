// Pages a person looks at rather than reads: the similarity heatmaps and the
// migration report, each one self-contained HTML file (uPlot inlined).
export { similarityPage, type SimilarityPageOptions } from './similarity-page.js';
export { migrationReport, timelineRounds, type MigrationReportOptions, type ReportRound } from './migration-page.js';
export { TimelineRecorder, DEFAULT_SAMPLE_MS, type Timeline, type TimelineEvent, type TimelineSample, type RecordableOptions } from './timeline.js';
export { writePage, escapeHtml, PAGE_CSP } from './html.js';
