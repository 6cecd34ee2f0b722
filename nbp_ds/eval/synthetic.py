"""The synthetic moving-shapes world of the quickstart: one definition shared by the generator and the checker.

Every clip shows one filled shape (square, circle or an upward-pointing isosceles triangle) in a single saturated
colour on a plain dark background, moving in a straight line at constant speed in one of four directions. The class
is the pair (shape, direction): 12 classes, ``CLASSES[i]`` is the name of class id ``i`` (shape-major order).

The world is built so that a simple, model-free detector (``nbp_ds.eval.consistency``) can read the class back from
pixels: the background is the same colour everywhere (the frame border tells it), the object's colour is far from
it, the object never leaves the frame, and the three shapes differ clearly in how much of their bounding box they
fill (square 1.0, circle pi/4 ~ 0.785, triangle 0.5), and the triangle, pointing up, holds only a quarter of its
area in the upper half of its bounding box.
"""

from __future__ import annotations

import numpy as np

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
DIRECTIONS: tuple[str, ...] = ("right", "left", "down", "up")
# Unit motion vectors in image coordinates (x to the right, y downwards, as rows are stored).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
CLASSES: tuple[str, ...] = tuple(f"{shape}_{direction}" for shape in SHAPES for direction in DIRECTIONS)

# The expected fill ratio (mask area / bounding-box area) of each shape; the checker classifies by the nearest one.
FILL_RATIOS: dict[str, float] = {"square": 1.0, "circle": float(np.pi / 4), "triangle": 0.5}
# The expected fraction of the shape's area in the upper half of its bounding box: 1/4 for the upward triangle
# (its top half is a triangle of half the size), 1/2 for the symmetric shapes. Rasterised at 32x32, a small circle
# and a small triangle can come within ~0.05 of each other in fill ratio alone; this second cue keeps them apart.
TOP_FRACTIONS: dict[str, float] = {"square": 0.5, "circle": 0.5, "triangle": 0.25}

# A dark, slightly blue grey: far (in RGB distance) from every object colour below, and dark enough that the
# yuv420p chroma subsampling of the mp4 round trip does not pull edge pixels of the object into the background.
BACKGROUND: tuple[int, int, int] = (28, 30, 38)
# Distinct saturated colours, each at least ~190 away from BACKGROUND in RGB distance.
OBJECT_COLORS: tuple[tuple[int, int, int], ...] = (
    (235, 45, 45),  # red
    (45, 205, 75),  # green
    (60, 110, 245),  # blue
    (240, 215, 45),  # yellow
    (225, 55, 210),  # magenta
    (45, 215, 225),  # cyan
    (250, 140, 30),  # orange
    (245, 245, 245),  # white
)
# The names of OBJECT_COLORS, in the same order (what the checker's colour reading answers).
COLOR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")

# Object size as a fraction of the frame side, and speed in pixels per frame at a 32-pixel frame (scaled linearly
# with the frame size so that a clip looks the same at every resolution). SIZE_RANGE is the default (the
# quickstart's): 40-50% of the side spans 3.2-4 tokens of a 4x-downsampling tokenizer, where 30-40% spanned 2.4-3.2,
# nearly all of them edge tokens; on the quickstart the larger objects kept their colour on 98% of the
# reconstructions (93% before) and their shape on 62% of the samples (51%, both drawn from the 4 likeliest codes;
# docs/quality.md). SIZE_LIMITS bound what a caller may ask for: not below 30%, since a circle only 8-9 pixels
# across rasterises, at some sub-pixel positions, into an octagon filling ~94% of its box, i.e. a square to any
# detector (and to a viewer; from ~9.6 pixels on its fill ratio stays below ~0.88); not above 60%, so that the
# object still has room to travel and covers well under the checker's MAX_AREA_FRACTION of the frame.
SIZE_RANGE: tuple[float, float] = (0.40, 0.50)
SIZE_LIMITS: tuple[float, float] = (0.30, 0.60)
SPEED_RANGE_AT_32: tuple[float, float] = (0.6, 1.5)
# Per-video background brightness jitter (added to all three channels), small enough to keep the background dark.
BACKGROUND_JITTER = 6


def parse_class(name: str) -> tuple[str, str]:
    """Split a class name like ``'circle_down'`` into ``('circle', 'down')``; raise ValueError for other names."""
    shape, _, direction = name.partition("_")
    if shape not in SHAPES or direction not in DIRECTIONS:
        raise ValueError(f"{name!r} is not a synthetic class name (<shape>_<direction> with shape in {SHAPES} and "
                         f"direction in {DIRECTIONS})")
    return shape, direction


def check_object_size(object_size: tuple[float, float] | list[float]) -> tuple[float, float]:
    """``object_size`` (smallest, largest fraction of the frame side) as a checked pair; ValueError naming the
    value when it is not two numbers with SIZE_LIMITS[0] <= smallest <= largest <= SIZE_LIMITS[1]."""
    low, high = SIZE_LIMITS
    if len(object_size) != 2 or not low <= float(object_size[0]) <= float(object_size[1]) <= high:
        raise ValueError(f"object size {list(object_size)} must be two fractions of the frame side, smallest first, "
                         f"within [{low}, {high}] (default {list(SIZE_RANGE)})")
    return float(object_size[0]), float(object_size[1])


def shape_mask(shape: str, x0: float, y0: float, side: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of ``shape`` whose bounding box is the square ``[x0, x0+side] x [y0, y0+side]``.

    Pixel (row i, column j) is inside when its centre (j + 0.5, i + 0.5) passes the shape's inside test, so
    sub-pixel positions move the rasterised shape smoothly from frame to frame (no anti-aliasing).
    """
    centres = np.arange(size, dtype=np.float64) + 0.5
    xs, ys = centres[None, :], centres[:, None]
    if shape == "square":
        return (xs >= x0) & (xs <= x0 + side) & (ys >= y0) & (ys <= y0 + side)
    if shape == "circle":
        r = side / 2
        return (xs - (x0 + r)) ** 2 + (ys - (y0 + r)) ** 2 <= r * r
    if shape == "triangle":
        # Apex at the top centre, base along the bottom edge, base width = height = side: a row at depth
        # (y - y0) below the apex is (y - y0) wide, so a pixel is inside when |x - xc| <= (y - y0) / 2
        # (the two slanted half-planes) and it is above the base (the third half-plane).
        xc = x0 + side / 2
        return (ys <= y0 + side) & (np.abs(xs - xc) <= (ys - y0) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_clip(shape: str, direction: str, frames: int, size: int, rng: np.random.Generator,
                object_size: tuple[float, float] = SIZE_RANGE) -> np.ndarray:
    """Render one clip of ``shape`` moving ``direction``: uint8 [frames, size, size, 3], deterministic from ``rng``.

    The object's colour, size (a fraction of the frame side drawn from ``object_size``, checked against
    SIZE_LIMITS), speed (SPEED_RANGE_AT_32 scaled to ``size``) and start
    position are drawn from ``rng``; the start is chosen so that the whole object stays inside the frame in every
    frame. When the clip is so long that the drawn speed would carry the object out, the speed is lowered to fit.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    if frames < 1 or size < 8:
        raise ValueError(f"need frames >= 1 and size >= 8, got frames={frames}, size={size}")
    object_size = check_object_size(object_size)
    dx, dy = DIRECTION_VECTORS[direction]

    color = np.array(OBJECT_COLORS[rng.integers(len(OBJECT_COLORS))], dtype=np.int16)
    side = rng.uniform(*object_size) * size
    speed = rng.uniform(*SPEED_RANGE_AT_32) * size / 32
    # Room left for travelling: the object (side) plus its path must fit inside [0, size]. A one-pixel margin
    # keeps the rasterised edge pixels away from the border, which the checker uses to estimate the background.
    room = size - side - 2.0
    if frames > 1:
        speed = min(speed, room / (frames - 1))
    travel = speed * (frames - 1)
    # Along the motion axis the start leaves `travel` pixels ahead; across it any position inside the margin works.
    along = 1.0 + rng.uniform(0.0, room - travel) if room > travel else 1.0
    across = 1.0 + rng.uniform(0.0, room)
    # For leftward/upward motion the object starts at the far end of its path.
    start = along + travel if (dx < 0 or dy < 0) else along
    x_start, y_start = (start, across) if dx != 0 else (across, start)
    background = np.array(BACKGROUND, dtype=np.int16) + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1)

    clip = np.empty((frames, size, size, 3), dtype=np.uint8)
    clip[:] = np.clip(background, 0, 255).astype(np.uint8)
    for t in range(frames):
        mask = shape_mask(shape, x_start + dx * speed * t, y_start + dy * speed * t, side, size)
        clip[t][mask] = color.astype(np.uint8)
    return clip
