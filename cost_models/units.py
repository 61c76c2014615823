"""Unit constants: one source of truth for every conversion in meshplan."""

KB = 1e3
MB = 1e6
GB = 1e9          # datasheets quote memory and bandwidth in decimal gigabytes
GIB = 2 ** 30
TERA = 1e12
GBIT_BYTES = 1e9 / 8   # one Gb/s expressed in bytes/s
US = 1e-6
SECONDS_PER_HOUR = 3600.0
