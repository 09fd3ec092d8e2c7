import fc from 'fast-check';

/** fc.record with ordinary prototypes, so deepStrictEqual compares it with decoded objects. */
export function record<T>(model: { [K in keyof T]: fc.Arbitrary<T[K]> }): fc.Arbitrary<T> {
  return fc.record(model, { noNullPrototype: true });
}
