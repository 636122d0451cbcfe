"""Where a key lives: Kafka's Java default partitioner (murmur2), as a pure function.

Everything about one payment is keyed by ``payment_id`` and must reach the partition of
its one writer. Producers in other languages place keys with murmur2 (Java's
``DefaultPartitioner``/``BuiltInPartitioner``, kafkajs, aiokafka, Faust); librdkafka's
default (``consistent_random``, CRC32) places the same key elsewhere. paystream therefore
configures every librdkafka producer with ``partitioner=murmur2_random`` and checks each
command's partition against :func:`java_partition` at intake.
"""

from __future__ import annotations

SEED = 0x9747B28C
_M = 0x5BD1E995
_R = 24
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2``: a signed 32-bit hash, as the Java client returns it."""
    length = len(data)
    h = (SEED ^ length) & _MASK
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> _R
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    rest = length % 4
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def java_partition(key: bytes, partitions: int) -> int:
    """The partition a Java producer (and librdkafka's ``murmur2_random``) picks for ``key``."""
    if partitions <= 0:
        raise ValueError(f"partitions must be positive, not {partitions}")
    return (murmur2(key) & 0x7FFFFFFF) % partitions
