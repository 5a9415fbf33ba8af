"""Identical and near-identical images in a dataset, grouped so that a split keeps each group on one side.

Public datasets hold the same cell more than once: byte-identical files, and copies re-encoded, brightened or
resized. A copy in training and another in test inflates every score, so `duplicate_groups` puts such images
into one group (union-find, so groups are transitive), and the splits keep every group on one side
(training/datasets.py: `split_units`).

Two images are duplicates when their bytes are the same (SHA-256), or when their perceptual hashes are at most
`MAX_DISTANCE` bits apart. The hash is a 256-bit DCT hash (pHash) of the grey image: shrunk to 64 x 64
pixels, transformed with the 2-D DCT, and the 16 x 16 lowest frequencies compared with their median, one bit
each. Each bit is set for about half the coefficients of any image, so the black background of a segmented
cell, which is the same in every image, does not make different cells look alike.

Why not the device's 64-bit difference hash (device.store.duplicates): it is made for one slide's repeats
(the device also asks for the same slide and box size), and 64 bits leave little room between an edited copy
and a different cell; hashed on the whole crop on black, two real C-NMC cells of different subjects in
tests/data/cnmc-sample were 1 bit apart (the device now hashes the cell's own box). The pHash below puts
those nine real cells at least 72 bits apart.

The bound, `MAX_DISTANCE` = 12 of 256 bits (4.7 %, as 3 of 64), measured (tests/test_duplicate_splits.py repeats
the main points): re-encoding as JPEG (quality 95 to 30), brightness -20 % to +25 %, contrast +20 %, gamma 0.8,
saturation +30 %, resizing to 224, 300 or 600 px (with and without JPEG), a slight blur or noise move the
hash of the nine real cells and of synthetic cells by at most 12 bits (JPEG quality 30 and gamma 0.8 the most;
most edits 2 to 6). The closest two DIFFERENT cells are 72 bits apart among the nine real cells and 20 bits
apart among 8 million pairs of 4,000 synthetic 450-pixel cells (training/synth.py; only 2 pairs within 20).
12 catches every edit above and stays 8 bits below the closest different pair. Not caught: a copy shifted or
cropped by a few pixels (2 px moves the hash by 16 to 26 bits), rotated or flipped; catching those would
merge different cells. An image too flat to hash (its 64 x 64 grey thumbnail varies less than `MIN_CONTRAST`
grey levels) and an unreadable one are matched by their bytes only.

Speed, measured on a 2-core machine: hashing costs 1.0 to 1.6 ms per 450 x 450 BMP (reading and decoding
included, in threads), 15 to 25 s for 15,000 images; the near-duplicate search compares every pair (XOR and
popcount over 4 x 64-bit words, in row chunks), about 1 s for 15,000 hashes (3 to 4 s on a busy machine).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from device.errors import ImageError
from device.imaging import decode_image

HASH_SIDE = 64
"""The grey image is shrunk to HASH_SIDE x HASH_SIDE pixels before the DCT."""
HASH_BLOCK = 16
"""The HASH_BLOCK x HASH_BLOCK lowest DCT frequencies give the bits."""
HASH_BITS = HASH_BLOCK * HASH_BLOCK
MAX_DISTANCE = 12
"""Near duplicates: at most this many of the HASH_BITS bits differ (see the module docstring)."""
MIN_CONTRAST = 2.0
"""A thumbnail whose grey levels vary less than this (std) is too flat to hash: matched by its bytes only."""
NEAR_RULE = f"pHash within {MAX_DISTANCE} of {HASH_BITS} bits"
RULE = f"same bytes (SHA-256) or {NEAR_RULE}"
"""What makes two images one group, in one line for reports."""


def image_phash(rgb: np.ndarray) -> np.ndarray | None:
    """The 256-bit DCT hash of a uint8 RGB (or grey) image as 32 bytes, or None when it is too flat to hash."""
    import cv2

    grey = rgb if rgb.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    if float(small.std()) < MIN_CONTRAST:
        return None
    low = cv2.dct(small)[:HASH_BLOCK, :HASH_BLOCK].ravel()
    return np.packbits(low > np.median(low[1:]))  # the DC term (the mean) is left out of the median


def hash_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Bits that differ between two hashes from `image_phash`."""
    return int(np.bitwise_count(np.bitwise_xor(a, b)).sum())


def file_hashes(path: str | Path) -> tuple[str | None, np.ndarray | None]:
    """(SHA-256 hex of the bytes, pHash) of an image file; None for what cannot be read or decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, None
    digest = hashlib.sha256(data).hexdigest()
    try:
        return digest, image_phash(decode_image(data))
    except ImageError:
        return digest, None


def near_pairs(hashes: np.ndarray, max_distance: int = MAX_DISTANCE, chunk: int = 256) -> np.ndarray:
    """Every pair (i, j), i < j, of rows of `hashes` (N x 32 uint8, from `image_phash`) at most max_distance apart.

    All pairs are compared, `chunk` rows at a time against the rows after them (XOR and popcount of 4 64-bit
    words): no bucketing, so no pair is missed; about 1 s for 15,000 hashes on 2 cores (see the module docstring).
    """
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    words = np.ascontiguousarray(hashes, dtype=np.uint8).view(np.uint64)  # N x (bits / 64)
    found = []
    for start in range(0, n - 1, chunk):
        rows = words[start : start + chunk]
        rest = words[start:]
        dist = np.zeros((len(rows), len(rest)), dtype=np.uint16)
        for w in range(words.shape[1]):
            dist += np.bitwise_count(rows[:, w, None] ^ rest[None, :, w])
        i, j = np.nonzero(dist <= max_distance)
        keep = j > i  # the upper triangle: each pair once, no image with itself
        found.append(np.stack([i[keep] + start, j[keep] + start], axis=1))
    return np.concatenate(found).astype(np.int64)


class UnionFind:
    """Disjoint sets over 0..n-1 (path halving, union by size)."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


def hash_files(paths: Sequence[str | Path], progress: bool = False) -> list[tuple[str | None, np.ndarray | None]]:
    """`file_hashes` of every path, in order, in threads (decoding and hashing release the GIL)."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(
            tqdm(
                pool.map(file_hashes, paths, chunksize=16),
                total=len(paths),
                desc="hashing for duplicates",
                unit="img",
                disable=not progress or len(paths) < 200,
            )
        )


def group_hashes(hashes: Sequence[tuple[str | None, np.ndarray | None]], max_distance: int = MAX_DISTANCE) -> list[int]:
    """Each image's group (the index of its group's first image) from (SHA-256, pHash) pairs: same bytes or
    pHashes within max_distance are one group, transitively."""
    uf = UnionFind(len(hashes))
    first: dict[str, int] = {}
    for i, (digest, _) in enumerate(hashes):
        if digest is not None:
            uf.union(first.setdefault(digest, i), i)
    hashed = [i for i, (_, h) in enumerate(hashes) if h is not None]
    if hashed:
        for a, b in near_pairs(np.stack([hashes[i][1] for i in hashed]), max_distance):
            uf.union(hashed[a], hashed[b])
    lowest: dict[int, int] = {}
    for i in range(len(hashes)):
        lowest.setdefault(uf.find(i), i)
    return [lowest[uf.find(i)] for i in range(len(hashes))]


def duplicate_groups(
    paths: Sequence[str | Path], progress: bool = False, max_distance: int = MAX_DISTANCE
) -> list[str]:
    """Each image's duplicate group name: "dup1", "dup2", ... (numbered in the order of their first image) for
    images with at least one duplicate, "" for an image that has none."""
    first = group_hashes(hash_files(paths, progress), max_distance)
    sizes: dict[int, int] = {}
    for g in first:
        sizes[g] = sizes.get(g, 0) + 1
    names: dict[int, str] = {}
    out = []
    for g in first:
        if sizes[g] < 2:
            out.append("")
            continue
        out.append(names.setdefault(g, f"dup{len(names) + 1}"))
    return out
