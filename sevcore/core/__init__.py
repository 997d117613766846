"""C-backed primitives: the memory engine, bitmaps, nested page tables, SEV packets, CRC-32,
bulk page kernels, and the numpy helpers around them. Needs numpy and the C core only."""
