// How a mirrored block is named on a replication link, and in the store's
// captures that feed it: one kind byte per block, and for data blocks a
// 16-byte content id (the cluster-keyed XXH3-128 the stores index blocks by).

export const KIND_HOLE = 0;
export const KIND_ZERO = 1;
export const KIND_DATA = 2;
export const CID_BYTES = 16;
