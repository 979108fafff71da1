// Loads blockferry's native addon for this platform, if it was built.
// Never throws: `addon` is null and `loadError` says why when it is missing
// or broken. BLOCKFERRY_NATIVE_PATH points at another .node file (tests use
// it to hide the addon).
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { arch, platform } from 'node:process';

const require = createRequire(import.meta.url);
const libc = platform === 'linux' ? (process.report?.getReport()?.header?.glibcVersionRuntime ? '-gnu' : '-musl') : '';
export const addonPath = process.env.BLOCKFERRY_NATIVE_PATH || fileURLToPath(new URL(`./blockferry.${platform}-${arch}${libc}.node`, import.meta.url));

let addon = null;
let loadError = null;
try {
  addon = require(addonPath);
} catch (e) {
  loadError = e instanceof Error ? e.message.split('\n')[0] : String(e);
}
export { addon, loadError };
