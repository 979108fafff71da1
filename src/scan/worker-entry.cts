// The file piscina loads in each worker thread. Piscina require()s its worker
// file first; on Node 20, require() of an ES module (our worker.js) can abort
// the whole process with a V8 assertion ("v8::Module::IsGraphAsync must be
// used on an instantiated module"), seen here under load. This CommonJS
// entry is require()d safely and loads the ES module with import() instead.
import type { ScanTask } from './layout.js';

type Handler = (task: ScanTask) => ArrayBuffer;
let handler: Promise<Handler> | undefined;

module.exports = function scanTask(task: ScanTask): Promise<ArrayBuffer> {
  handler ??= import('./worker.js').then((m) => m.default);
  return handler.then((h) => h(task));
};
