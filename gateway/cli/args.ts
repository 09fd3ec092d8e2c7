// Command-line parsing: positionals and --options in any order, each option
// declared as a flag, a value, or a repeatable value. Anything undeclared is
// a usage error naming the culprit.

export class UsageError extends Error {
  readonly code = 'ERR_USAGE';
}

export interface OptionSpec {
  flags?: string[];
  values?: string[];
  repeatable?: string[];
}

export interface Parsed {
  positionals: string[];
  flags: Set<string>;
  values: Map<string, string>;
  repeated: Map<string, string[]>;
}

export function parseArgs(argv: string[], spec: OptionSpec): Parsed {
  const out: Parsed = { positionals: [], flags: new Set(), values: new Map(), repeated: new Map() };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (!arg.startsWith('--') || arg === '--') {
      out.positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq === -1 ? arg.slice(2) : arg.slice(2, eq);
    const inline = eq === -1 ? undefined : arg.slice(eq + 1);
    if (spec.flags?.includes(name)) {
      if (inline !== undefined) throw new UsageError(`--${name} takes no value`);
      out.flags.add(name);
      continue;
    }
    const isValue = spec.values?.includes(name);
    const isRepeat = spec.repeatable?.includes(name);
    if (!isValue && !isRepeat) throw new UsageError(`unknown option --${name}`);
    const value = inline ?? argv[++i];
    if (value === undefined || (inline === undefined && value.startsWith('--'))) {
      throw new UsageError(`--${name} needs a value`);
    }
    if (isRepeat) out.repeated.set(name, [...(out.repeated.get(name) ?? []), value]);
    else if (out.values.has(name)) throw new UsageError(`--${name} given twice`);
    else out.values.set(name, value);
  }
  return out;
}
