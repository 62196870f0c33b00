"""How large a rank's multipart parts and data objects are, given how many bytes it saves.

A save is fast when every connection has a part to send until the end. With fixed 16 MiB
parts, a 256 MiB save has 16 parts, so at most 16 requests ever run at once, however many
connections are allowed; on a cloud store, where one connection carries tens of MB/s, that
bounds the save. So, unless the caller chose them, parts shrink (down to S3's 5 MiB minimum)
until a rank's bytes make a part for every connection, and data objects shrink with the
checkpoint (about an eighth of it each, at least four parts), so that small checkpoints are
spread over several objects too: each completes on its own, and a ranged read of a small
object costs little even on stores that pay per object byte. Where an eighth of a rank is
under four parts (fewer than 32 parts in all), each object is one part: it goes up as one PUT,
side by side with the others, without a multipart upload's start and completion, which are
round trips of their own (and a completion may copy the object on the server).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import MAX_PARTS, MIN_PART_SIZE, MiB

#: parts per connection that a rank's bytes should make at least (where parts may shrink)
PARTS_PER_CONNECTION = 1
#: a rank's bytes are spread over about this many data objects when the checkpoint is small
OBJECTS_PER_RANK = 8
#: an object of several parts is at least this many, so that its parts go up side by side;
#: below that, objects are one part each
MIN_PARTS_PER_OBJECT = 4


@dataclass(frozen=True)
class SaveSizes:
    """The part and object size of one rank's save."""

    part_size: int
    object_size: int


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def save_sizes(
    total_bytes: int,
    *,
    part_size: int,
    object_size: int,
    max_concurrency: int,
    part_size_given: bool,
    object_size_given: bool,
    one_part_objects: bool = False,
) -> SaveSizes:
    """Part and object size for a rank that saves about ``total_bytes`` of tensors.

    ``part_size`` and ``object_size`` are the largest sizes (the defaults or the caller's);
    a size the caller gave (``*_given``) is kept as it is. ``one_part_objects``: the store
    prefers objects of one part (GCS), so an object is one part unless the caller said
    otherwise.
    """
    part = part_size
    if not part_size_given:
        wanted = _round_up(max(1, total_bytes) // (PARTS_PER_CONNECTION * max(1, max_concurrency)), MiB)
        part = min(part_size, max(MIN_PART_SIZE, wanted))
    if object_size_given:
        # an object may have at most MAX_PARTS parts
        part = max(part, min(part_size, _round_up(-(-object_size // MAX_PARTS), MiB)))
        return SaveSizes(part, object_size)
    eighth = max(1, total_bytes) // OBJECTS_PER_RANK
    if one_part_objects or eighth < MIN_PARTS_PER_OBJECT * part:
        return SaveSizes(part, part)
    return SaveSizes(part, min(max(object_size, part), _round_up(eighth, part)))
