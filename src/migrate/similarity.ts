// Strategy "similarity" (paper 001): the destination first fills every block
// it can from its neighbour images, then from its base-image repository if
// it has one (each block checked against the source's fingerprints), and
// only the rest crosses the network.
import { CAP_SIMILARITY } from '../protocol/handshake.js';
import { FILL_NEIGHBOURS, FILL_REPOSITORY } from '../protocol/messages.js';
import { precopy } from './precopy.js';
import type { Strategy } from './strategy.js';

export const similarity: Strategy = { name: 'similarity', fills: FILL_NEIGHBOURS | FILL_REPOSITORY, requires: CAP_SIMILARITY, postcopyOnStall: true, run: precopy };
