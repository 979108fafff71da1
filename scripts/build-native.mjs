// Builds the optional native addon (native/) with `napi build` when cargo is
// on this machine. Never fails the install: without cargo, or when the build
// breaks, it prints one notice and blockferry runs on its WASM core.
import { spawnSync } from 'node:child_process';

const notice = (msg) => console.warn(`blockferry: notice: ${msg}; using the WASM core (run \`blockferry doctor\` to see the backends)`);
if (process.env.BLOCKFERRY_SKIP_NATIVE) {
  notice('BLOCKFERRY_SKIP_NATIVE is set: native addon not built');
  process.exit(0);
}
if (spawnSync('cargo', ['--version'], { stdio: 'ignore' }).status !== 0) {
  notice('cargo not found: native addon not built');
  process.exit(0);
}
const r = spawnSync('npx', ['napi', 'build', '--release', '--manifest-path', 'native/Cargo.toml', '--output-dir', 'native', '--platform'], {
  stdio: ['ignore', 'inherit', 'inherit'],
});
if (r.status !== 0) notice(`the native addon failed to build (exit ${r.status})`);
