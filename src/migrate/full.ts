// Strategy "full": every non-zero block's content crosses the network once
// (repeats inside the image become copies); the destination's neighbourhood
// is not consulted. Paper 001's baseline.
import { precopy } from './precopy.js';
import type { Strategy } from './strategy.js';

export const full: Strategy = { name: 'full', fills: 0, requires: 0, postcopyOnStall: true, run: precopy };
