// Every strategy, by name: the one table a new strategy joins.
import { full } from './full.js';
import { similarity } from './similarity.js';
import { hybrid, postcopy } from './postcopy.js';
import type { Strategy } from './strategy.js';

export const STRATEGIES: Readonly<Record<string, Strategy>> = { full, similarity, postcopy, hybrid };
export type StrategyName = 'full' | 'similarity' | 'postcopy' | 'hybrid';
