"""Shared-memory blocks: how ranks on one host hand each other the bytes of a shared read.

An owner puts the bytes it fetched for a round in a file under ``/dev/shm`` (a RAM-backed
filesystem), and the ranks that need them and see the same ``/dev/shm`` map it and copy or
decode straight out of it: one memory copy per receiver instead of a trip through TCP.

Trust: a block's name is derived from a secret token of the load (:func:`block_name`), so no
other user can predict it to plant a file or link there first; the owner creates it with
``O_CREAT | O_EXCL`` (which never follows a link), mode 0600, and reserves its pages up front so
a full ``/dev/shm`` fails the creation (the round then goes over gloo) rather than the first
write. A receiver opens it without following links and maps it only when it is a regular file of
this user, mode 0600, of exactly the size the plan gives. The owner unlinks its block once every
receiver has passed the next collective (by then each one holds its own mapping); on a failed
load every surviving rank of the host sweeps the load's blocks there (an owner that was killed
cannot), so a block outlives its load only when every rank of its host is killed.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
from dataclasses import dataclass

from ..errors import DcpCloudError

#: where blocks are made: a tmpfs on Linux; without it (or where it is not writable) ranks
#: exchange shared bytes over gloo. ``DCP_CLOUD_SHM_DIR`` names another directory (another tmpfs,
#: say a larger one in a container); every rank of a host must name the same one to share it.
DEFAULT_SHM_DIR = "/dev/shm"


def shm_dir() -> str:
    """The directory blocks are made in: ``DCP_CLOUD_SHM_DIR``, else ``/dev/shm``."""
    return os.environ.get("DCP_CLOUD_SHM_DIR") or DEFAULT_SHM_DIR


#: every block's name starts with this
PREFIX = "dcp_cloud_share_"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def shm_domain(host: str) -> str | None:
    """What ranks must agree on to exchange bytes through ``/dev/shm``: the host (``host``, as
    the "host" scope names it), the boot of its kernel and the very ``/dev/shm`` this process
    sees (containers on one host usually have one each). None where there is no usable one."""
    try:
        with open(_BOOT_ID) as f:
            boot = f.read().strip()
        info = os.stat(shm_dir())
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or not os.access(shm_dir(), os.W_OK | os.X_OK):
        return None
    return f"{host}|{boot}|{info.st_dev}:{info.st_ino}"


def block_name(token: str, round_no: int, owner: int) -> str:
    """The name of ``owner``'s block of round ``round_no`` in the load whose secret is ``token``."""
    digest = hashlib.sha256(f"{token}/{round_no}/{owner}".encode()).hexdigest()[:40]
    return PREFIX + digest


class SharedBlockError(DcpCloudError):
    """A peer's shared-memory block is missing or not what the plan says it is."""


@dataclass
class Block:
    """A mapped block of ``size`` bytes. The mapping is never closed by hand: tensors made on
    it (``torch.frombuffer``) hold the mmap object, not a buffer export, so it is unmapped
    when the last of them and this go."""

    name: str
    memory: mmap.mmap
    size: int


def create_block(name: str, size: int) -> Block | None:
    """A new block of ``size`` bytes, its pages reserved; None when ``/dev/shm`` has no room or
    the name is taken (the round's bytes then go over gloo)."""
    try:
        directory = os.open(shm_dir(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=directory,
            )
        except OSError:
            return None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.posix_fallocate(fd, 0, size)
            memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError as exc:
            _unlink_quietly(name, directory)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                return None
            raise
        finally:
            os.close(fd)
    finally:
        os.close(directory)
    return Block(name, memory, size)


def open_block(name: str, size: int, owner: int) -> Block:
    """Map ``owner``'s block, after checking it is the one the plan describes."""
    where = f"{shm_dir()}/{name}"
    directory = os.open(shm_dir(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            # read-write like the owner's: decoding views the bytes as tensors, which torch
            # wants writable; a peer of the same job is trusted with them as over gloo
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        except OSError as exc:
            raise SharedBlockError(
                f"cannot open {where}, where rank {owner} put bytes this rank needs ({exc}). "
                "Ranks that see different /dev/shm must run as different hosts: set "
                "DCP_CLOUD_HOST_ID per machine or container, or load with share_reads='off'."
            ) from exc
    finally:
        os.close(directory)
    try:
        info = os.fstat(fd)
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.geteuid()
            or stat.S_IMODE(info.st_mode) != 0o600
            or info.st_size != size
        ):
            raise SharedBlockError(
                f"{where} is not the block rank {owner} made for this load (expected a "
                f"regular file of this user, mode 0600, {size} bytes; found mode "
                f"{oct(info.st_mode)}, owner uid {info.st_uid}, {info.st_size} bytes). Another "
                "process interfered with /dev/shm; load again, or with share_reads='off'."
            )
        memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)
    return Block(name, memory, size)


def unlink_block(name: str) -> bool:
    """Remove a block this load made, if it is there: only a regular file of this user (never
    what a link points to). True when one was removed."""
    try:
        directory = os.open(shm_dir(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            info = os.lstat(name, dir_fd=directory)
        except OSError:
            return False
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return False
        return _unlink_quietly(name, directory)
    finally:
        os.close(directory)


def _unlink_quietly(name: str, directory: int) -> bool:
    try:
        os.unlink(name, dir_fd=directory)
        return True
    except FileNotFoundError:
        return False
