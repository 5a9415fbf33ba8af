"""Cells that appear twice in one slide, and the review state of a cell and its repeats.

The same white cell can be stored more than once in a slide: a field captured again, or two
overlapping fields. Counting it twice inflates the slide's cell count and biases its blast
fraction, so each cell's crop gets a perceptual hash when it is stored, and a new cell is marked
`duplicate_of` an earlier cell of the same slide when the two hashes are close AND the two boxes
have about the same size. Slide counts, the blast fraction and its CI then count each cell once.

The hash is a 64-bit difference hash (dHash) of the grey crop: the cell's own box within the crop (the
model's input, the cell cut out on black), shrunk to 9 x 8 pixels, one bit per horizontal neighbour pair
("brighter to the right"). It ignores brightness, contrast and JPEG noise and changes little with small
changes of the crop. Hashing the whole crop instead made its 9 x 8 thumbnail mostly the cell's outline, so
round cells of one size hashed alike (two different demo cells were 2 bits apart).

The bound, measured on the shipped demo fields (device/demo/fields, 13 cells; tests/test_dashboard_data.py
repeats the measurement): the same field analysed again gives identical crops (distance 0); the closest
two DIFFERENT cells are 13 bits apart. A repeat is therefore at most `MAX_HAMMING` = 4 bits away, and its
box differs by at most `MAX_SIZE_CHANGE` = 20 % in width and in height (the same cell re-found in a shifted
field changed its box by at most 12 %). When the stage moved and the finder cut the cell differently, its
hash can move further: such repeats are caught only in part; a wider bound would merge different cells,
which is the worse error (a cell that is never counted is never reviewed either).

A cell and its repeats form a group under the first cell (`duplicate_of` always names a first cell,
never a repeat): a review of any copy reviews the group, so nobody has to review the same cell twice,
and a repeat whose group is reviewed is not pending, not unreviewed and does not hold back retention.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

HASH_BITS = 64
MAX_HAMMING = 4
"""At most this many of the 64 bits differ between a cell and its repeat (see the module docstring)."""
MAX_SIZE_CHANGE = 0.2
"""A repeat's box width and height each differ by at most this fraction of the larger one."""
TIGHT_LEVEL = 16
"""Grey levels above this are the cell (the crop's surround is black, with JPEG and resampling smear)."""
MIN_CONTRAST = 2.0
"""A crop whose 9 x 8 grey thumbnail varies less than this (std, grey levels) is too flat to hash: not checked."""


def crop_dhash(crop: np.ndarray) -> int | None:
    """The 64-bit dHash of a uint8 RGB (or grey) crop, or None when the crop is too flat to tell cells apart."""
    import cv2  # only the pipeline hashes; the store itself only compares

    grey = crop if crop.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
    # The cell's own box, not the black around it: at 9 x 8 the whole crop is mostly the cell's outline, and
    # round cells of one size then hash alike (2 bits apart); the cell alone shows its texture.
    cell = grey > TIGHT_LEVEL
    ys, xs = np.flatnonzero(cell.any(axis=1)), np.flatnonzero(cell.any(axis=0))  # its rows and columns
    if ys.size:
        grey = grey[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    if float(small.std()) < MIN_CONTRAST:
        return None
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def to_hex(h: int | None) -> str | None:
    return None if h is None else f"{h:016x}"


def from_hex(text: str | None) -> int | None:
    return None if not text else int(text, 16)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def similar_size(a: Sequence[int], b: Sequence[int], tolerance: float = MAX_SIZE_CHANGE) -> bool:
    """Do boxes (x0, y0, x1, y1) a and b have about the same width and height?"""
    for lo, hi in ((0, 2), (1, 3)):
        sa, sb = a[hi] - a[lo], b[hi] - b[lo]
        if sa <= 0 or sb <= 0 or abs(sa - sb) > tolerance * max(sa, sb):
            return False
    return True


def match_repeats(
    new: Sequence[tuple[int | None, Sequence[int]]],
    earlier: Iterable[tuple[int, int, Sequence[int]]],
    max_hamming: int = MAX_HAMMING,
) -> list[int | None]:
    """For each new cell (hash, box), the id of the earlier cell (id, hash, box) it repeats, or None.

    Closest pairs are matched first and each earlier cell takes at most one new cell: two cells of one
    field are never the same cell.
    """
    earlier = list(earlier)
    out: list[int | None] = [None] * len(new)
    if not earlier or not new:
        return out
    ids = np.array([e[0] for e in earlier], dtype=np.int64)
    hashes = np.array([e[1] for e in earlier], dtype=np.uint64)
    pairs = []
    for i, (h, box) in enumerate(new):
        if h is None:
            continue
        x = np.bitwise_xor(hashes, np.uint64(h))
        dist = np.unpackbits(x.view(np.uint8)).reshape(len(x), HASH_BITS).sum(axis=1)
        for j in np.flatnonzero(dist <= max_hamming):
            if similar_size(box, earlier[j][2]):
                pairs.append((int(dist[j]), int(ids[j]), i))
    taken: set[int] = set()
    for _, cell_id, i in sorted(pairs):
        if out[i] is None and cell_id not in taken:
            out[i] = cell_id
            taken.add(cell_id)
    return out


# -- review state of a cell's group, as SQL over a `cells` row alias -------------------------------------------


def group_of(alias: str) -> str:
    """The id of the first cell of alias's group (itself, unless it repeats an earlier cell)."""
    return f"COALESCE({alias}.duplicate_of, {alias}.id)"


def group_reviewed(alias: str) -> str:
    """SQL: someone reviewed the cell `alias` or another copy of it."""
    g = group_of(alias)
    return (
        f"(EXISTS (SELECT 1 FROM reviews rv_{alias} WHERE rv_{alias}.cell_id = {g})"
        f" OR EXISTS (SELECT 1 FROM cells dd_{alias} JOIN reviews rd_{alias} ON rd_{alias}.cell_id = dd_{alias}.id"
        f" WHERE dd_{alias}.duplicate_of = {g}))"
    )


def group_latest_review(alias: str) -> str:
    """SQL: the id of the newest review of the cell `alias` or another copy of it (NULL: none)."""
    g = group_of(alias)
    return (
        f"(SELECT MAX(rl_{alias}.id) FROM reviews rl_{alias} WHERE rl_{alias}.cell_id = {g}"
        f" OR rl_{alias}.cell_id IN (SELECT dl_{alias}.id FROM cells dl_{alias} WHERE dl_{alias}.duplicate_of = {g}))"
    )


def group_flagged(alias: str) -> str:
    """SQL, for a first cell `alias`: the model flagged it or one of its repeats for review."""
    return (
        f"({alias}.needs_review = 1 OR EXISTS (SELECT 1 FROM cells df_{alias}"
        f" WHERE df_{alias}.duplicate_of = {alias}.id AND df_{alias}.needs_review = 1))"
    )
