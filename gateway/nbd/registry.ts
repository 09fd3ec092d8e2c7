import type { BlockDevice } from '../device/block-device';

/** What the NBD layer needs to know of an export; the volume manager provides it. */
export interface NbdExport {
  readonly name: string;
  readonly description: string;
  readonly device: BlockDevice;
}

export interface ClientInfo {
  readonly id: number;
  readonly remote: string;
}

export interface ExportRegistry {
  /** The export an empty name selects, if any. */
  defaultExport(): string | null;
  list(): Array<{ name: string; description: string }>;
  get(name: string): NbdExport | null;
  /**
   * Registers a client entering transmission on an export; returns its release.
   * Throws if the export went away between negotiation and now.
   */
  attach(name: string, client: ClientInfo): () => void;
}
