"""Shapes: a procedural, captioned toy dataset that every chapter of the course trains on.

A scene is one or two coloured shapes placed in the cells of a 3x3 grid on a black background,
with a caption that states every attribute ("a big red circle at the top left", "a small blue
cross above a big green square"). Everything is computed from a seed, so the dataset is offline,
deterministic and as large as you like. Images are drawn with signed distance functions (SDFs):
the coverage of a pixel is ~ clamp(0.5 - sdf, 0, 1), which anti-aliases edges without rendering at
a higher resolution first, and is vectorised over the whole batch (tens of thousands of images/s).

Labels travel with every image: `objects[n, k] = (shape, color, size, position)` for object k of
scene n (rows of -1 where a scene has only one object). See datasets/README.md for the datasheet.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
COLOR_RGB = torch.tensor([  # chosen to stay distinct in RGB and in grayscale luminance
    [0.90, 0.12, 0.12],   # red
    [1.00, 0.55, 0.05],   # orange
    [0.95, 0.92, 0.15],   # yellow
    [0.15, 0.75, 0.20],   # green
    [0.20, 0.35, 1.00],   # blue
    [0.65, 0.20, 0.85],   # purple
])
SIZES = ("small", "big")
SIZE_RADIUS = (0.27, 0.40)      # object radius as a fraction of a grid cell
JITTER = 0.05                   # max centre offset, fraction of a cell (objects never leave their cell)
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # cell index = 3 * row + col
RELATIONS = ("above", "below", "left of", "right of")  # "A <relation> B"
INVERSE_RELATION = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
GRID = 3
MAX_OBJECTS = 2

# (shape, color, size) triples never shown in the "train" split: compositional zero-shot tests.
# Every shape, every color and every shape x color pair still appears in training.
HELD_OUT = (("circle", "blue", "big"), ("square", "red", "small"), ("triangle", "green", "big"),
            ("diamond", "yellow", "small"), ("cross", "purple", "big"))
SPLITS = ("train", "test", "holdout", "all")

ONE_OBJECT_TEMPLATES = (
    "a {obj} at the {pos}",
    "there is a {obj} at the {pos}",
    "at the {pos} there is a {obj}",
    "a picture of a {obj} in the {pos}",
    "in the {pos} a {obj}",
)
TWO_OBJECT_TEMPLATES = (
    "a {a} {rel} a {b}",
    "there is a {a} {rel} a {b}",
    "a picture of a {a} {rel} a {b}",
    "a {a} placed {rel} a {b}",
)


SEED_MAX = 2**63 - 1             # every seed here becomes a torch.Generator seed (a signed 64-bit int)


def _as_int(value, name, what):
    """value as a Python int: ints, numpy ints and integer 0-d tensors pass; bools, floats and strings do not."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int ({what}), got {type(value).__name__} {value!r}")


def check_seed(seed, name="seed"):
    """seed as a Python int in [0, SEED_MAX]: the one check every seeded function shares, so a bad seed
    gets a clear error instead of torch's "Overflow when unpacking long long"."""
    value = _as_int(seed, name, "a random seed")
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"{name} must be an int in [0, 2**63 - 1], got {value}")
    return value


def _check_count(value, name, what, minimum=0):
    """value as a Python int >= minimum; a clear error for a float, a string or a negative count."""
    value = _as_int(value, name, what)
    if value < minimum:
        bound = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {bound} ({what}), got {value}")
    return value


def check_prompt_list(prompts, name="prompts"):
    """A list of prompts, one per image; a bare string would be read as one prompt per character."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"{name} must be a list of captions, one per image; got a single {type(prompts).__name__} "
                        f"{prompts!r:.60} (wrap it in a list)")
    return prompts


def triple_id(shape, color, size):
    """Index of a (shape, color, size) triple in 0..59; works on ints or tensors."""
    return (shape * len(COLORS) + color) * len(SIZES) + size


def pair_id(shape, color):
    """Index of a (shape, color) pair in 0..29: the class label of chapters 09-11; ints or tensors."""
    return shape * len(COLORS) + color


NUM_PAIRS = len(SHAPES) * len(COLORS)


def pair_caption(pair):
    """The shortest caption of class `pair`: 'a red circle'."""
    if not 0 <= int(pair) < NUM_PAIRS:
        raise ValueError(f"class id out of range: {pair!r} is not in [0, {NUM_PAIRS})")
    shape, color = divmod(int(pair), len(COLORS))
    return f"a {COLORS[color]} {SHAPES[shape]}"


def pair_prompts(n, seed=0):
    """n class ids, every class equally often (in a seeded random order), and their captions."""
    g = torch.Generator().manual_seed(check_seed(seed))
    classes = (torch.arange(n) % NUM_PAIRS)[torch.randperm(n, generator=g)]
    return classes, [pair_caption(c) for c in classes.tolist()]


HELD_OUT_IDS = tuple(triple_id(SHAPES.index(s), COLORS.index(c), SIZES.index(z)) for s, c, z in HELD_OUT)


# ----------------------------------------------------------------------------- scenes (labels)

@dataclass
class Scenes:
    """A batch of scene descriptions: what render() draws and what captions state."""
    objects: torch.Tensor      # (N, 2, 4) long: shape, color, size, position; -1 rows when absent
    offsets: torch.Tensor      # (N, 2, 2) float: (dx, dy) jitter of each centre, fraction of a cell
    captions: list
    choices: torch.Tensor | None = None   # (N, 3) the caption's (template, relation, order) choices, if known

    def __len__(self):
        return len(self.captions)

    @property
    def num_objects(self):
        return (self.objects[:, :, 0] >= 0).sum(1)


def _split_triples(split):
    held = torch.tensor(HELD_OUT_IDS)
    every = torch.arange(len(SHAPES) * len(COLORS) * len(SIZES))
    seen = every[~torch.isin(every, held)]
    return {"train": (seen, seen), "test": (seen, seen), "holdout": (held, seen), "all": (every, every)}[split]


def _chunk_generator(seed, split, chunk):
    # one independent stream per (seed, split, chunk): item i never depends on the dataset length
    return torch.Generator().manual_seed(((seed * 1_000_003 + SPLITS.index(split)) * 1_000_033 + chunk) % 2**63)


def sample_scenes(n, split="train", seed=0, num_objects=None, p_two=0.5, start=0, chunk_size=1024):
    """Scenes start..start+n-1 of a split. num_objects: 1, 2 or None (mixed, two with prob p_two)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if num_objects not in (None, 1, 2):
        raise ValueError(f"num_objects must be 1, 2 or None (mixed), got {num_objects!r}; "
                         f"a scene holds at most {MAX_OBJECTS} objects in a {GRID}x{GRID} grid")
    if not 0.0 <= p_two <= 1.0:
        raise ValueError(f"p_two must be a probability in [0, 1], got {p_two}")
    n, start = _check_count(n, "n", "the number of scenes"), _check_count(start, "start", "the first scene's index")
    seed = check_seed(seed)
    parts, first, last = [], start // chunk_size, (start + n - 1) // chunk_size
    for chunk in range(first, last + 1) if n else []:
        whole = _sample_chunk(chunk_size, _chunk_generator(seed, split, chunk), split, num_objects, p_two)
        lo = max(start - chunk * chunk_size, 0)
        hi = min(start + n - chunk * chunk_size, chunk_size)
        parts.append(Scenes(whole.objects[lo:hi], whole.offsets[lo:hi], whole.captions[lo:hi], whole.choices[lo:hi]))
    if not parts:
        return Scenes(torch.empty(0, MAX_OBJECTS, 4, dtype=torch.long), torch.empty(0, MAX_OBJECTS, 2), [],
                      torch.empty(0, 3, dtype=torch.long))
    return Scenes(torch.cat([p.objects for p in parts]), torch.cat([p.offsets for p in parts]),
                  sum((p.captions for p in parts), []), torch.cat([p.choices for p in parts]))


def _sample_chunk(n, g, split, num_objects, p_two):
    first_pool, other_pool = _split_triples(split)
    two = torch.rand(n, generator=g) < p_two
    if num_objects is not None:
        two = torch.full((n,), num_objects == 2)
    triples = torch.stack([first_pool[torch.randint(len(first_pool), (n,), generator=g)],
                           other_pool[torch.randint(len(other_pool), (n,), generator=g)]], 1)
    cell0 = torch.randint(GRID * GRID, (n,), generator=g)
    cell1 = (cell0 + 1 + torch.randint(GRID * GRID - 1, (n,), generator=g)) % (GRID * GRID)  # a different cell
    offsets = (torch.rand(n, MAX_OBJECTS, 2, generator=g) * 2 - 1) * JITTER
    size = triples % len(SIZES)
    color = (triples // len(SIZES)) % len(COLORS)
    shape = triples // (len(SIZES) * len(COLORS))
    objects = torch.stack([shape, color, size, torch.stack([cell0, cell1], 1)], -1)
    objects[~two, 1] = -1
    offsets[~two, 1] = 0.0
    choices = torch.randint(1 << 30, (n, 3), generator=g)  # template, relation, order choices
    captions = [_caption(o, c) for o, c in zip(objects.tolist(), choices.tolist())]
    return Scenes(objects, offsets, captions, choices)


def object_phrase(shape, color, size):
    return f"{SIZES[size]} {COLORS[color]} {SHAPES[shape]}"


def relations_between(cell_a, cell_b):
    """Every relation that holds for 'object in cell_a <relation> object in cell_b'."""
    (ra, ca), (rb, cb) = divmod(cell_a, GRID), divmod(cell_b, GRID)
    return [rel for rel, holds in zip(RELATIONS, (ra < rb, ra > rb, ca < cb, ca > cb)) if holds]


def caption(objects, choice=(0, 0, 0)):
    """The caption sample_scenes writes for one scene: objects [(shape, color, size, cell), (...)] (the second row
    all -1 for a one-object scene) and choice = (template, relation, order) indices, taken modulo their options."""
    return _caption([list(map(int, o)) for o in objects], choice)


def _caption(objs, choice):
    (s0, c0, z0, p0), (s1, c1, z1, p1) = objs
    if s1 < 0:
        template = ONE_OBJECT_TEMPLATES[choice[0] % len(ONE_OBJECT_TEMPLATES)]
        return template.format(obj=object_phrase(s0, c0, z0), pos=POSITIONS[p0])
    a, b = object_phrase(s0, c0, z0), object_phrase(s1, c1, z1)
    options = relations_between(p0, p1)
    rel = options[choice[1] % len(options)]
    if choice[2] % 2:  # say it the other way round half of the time: "B below A" for "A above B"
        a, b, rel = b, a, INVERSE_RELATION[rel]
    return TWO_OBJECT_TEMPLATES[choice[0] % len(TWO_OBJECT_TEMPLATES)].format(a=a, rel=rel, b=b)


# ----------------------------------------------------------------------------- captions -> labels

@dataclass
class ObjectSpec:
    """What a caption says about one object; None where it says nothing."""
    shape: int
    color: int | None = None
    size: int | None = None
    position: int | None = None

    def __str__(self):
        words = [SIZES[self.size] if self.size is not None else None,
                 COLORS[self.color] if self.color is not None else None, SHAPES[self.shape]]
        where = f" at the {POSITIONS[self.position]}" if self.position is not None else ""
        return " ".join(w for w in words if w) + where


@dataclass
class Prompt:
    objects: list            # one or two ObjectSpec, in caption order
    relation: str | None     # "first <relation> second", or None

    def __str__(self):
        first = f"a {self.objects[0]}"
        return first if len(self.objects) == 1 else f"{first} {self.relation or 'and'} a {self.objects[1]}"


FILLER_WORDS = {"a", "an", "the", "there", "is", "at", "in", "of", "picture", "photo", "image",
                "and", "placed", "with", "on", "to", "one"}
_POSITION_WORDS = {"top", "bottom", "left", "right", "center", "centre", "middle"}


def parse_caption(text):
    """Read a caption back into a Prompt. Unknown words are an error (a typo must not pass silently), and so
    are contradictions ("a big small circle"). Position words belong to the object before them, or to the
    first object when they come first, so each of two objects may have its own position."""
    if not isinstance(text, str):
        raise TypeError(f"captions must be str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"empty caption {text!r}: a caption must name at least one shape")
    words = re.sub(r"[,.;:!]", " ", text.lower()).split()
    objects, pending, relation = [], {}, None
    places = []  # one (index of the object before it or -1, [position words]) per run of position words
    i = 0
    while i < len(words):
        w = words[i]
        nxt = words[i + 1] if i + 1 < len(words) else None
        if w in ("left", "right") and nxt == "of" or w in ("above", "below"):
            if relation is not None:
                raise ValueError(f"caption {text!r} states more than one relation")
            relation = f"{w} of" if w in ("left", "right") else w
            i += 2 if w in ("left", "right") else 1
            continue
        if w in _POSITION_WORDS:
            word = {"centre": "center", "middle": "center"}.get(w, w)
            if i > 0 and words[i - 1] in _POSITION_WORDS:
                places[-1][1].append(word)
            else:
                places.append((len(objects) - 1, [word]))
        elif w in SIZES or w in COLORS:
            key, names = ("size", SIZES) if w in SIZES else ("color", COLORS)
            if key in pending and names[pending[key]] != w:
                raise ValueError(f"caption {text!r} gives one object two {key}s: "
                                 f"{names[pending[key]]!r} and {w!r}")
            pending[key] = names.index(w)
        elif w.rstrip("s") in SHAPES or w in SHAPES:
            objects.append(ObjectSpec(SHAPES.index(w if w in SHAPES else w.rstrip("s")), **pending))
            pending = {}
        elif w not in FILLER_WORDS:
            raise ValueError(f"unknown word {w!r} in caption {text!r}; shapes: {', '.join(SHAPES)}; "
                             f"colors: {', '.join(COLORS)}; sizes: {', '.join(SIZES)}")
        i += 1
    if pending:
        raise ValueError(f"caption {text!r} has {' '.join(map(str, pending))} words not followed by a shape")
    if not objects:
        raise ValueError(f"caption {text!r} names no shape; shapes are: {', '.join(SHAPES)}")
    if len(objects) > MAX_OBJECTS:
        raise ValueError(f"caption {text!r} names {len(objects)} objects; scenes hold at most {MAX_OBJECTS}")
    if relation and len(objects) != 2:
        raise ValueError(f"caption {text!r} states a relation but names {len(objects)} object(s)")
    _place_objects(text, objects, places)
    if len(objects) == 2 and any(o.position is not None for o in objects):
        _check_drawable(text, objects, relation)
    return Prompt(objects, relation)


def _place_objects(text, objects, places):
    """Give each object the position words of the runs that belong to it."""
    owners = [max(before, 0) for before, _ in places]
    for k, (before, _) in enumerate(places):
        # "in the top left a circle, in the bottom right a square": a second place after an object that has
        # one already is the next object's, unless that object is placed later in the caption
        after = before + 1
        if before >= 0 and before in owners[:k] and after < len(objects) \
                and all(b != after for b, _ in places[k + 1:]):
            owners[k] = after
    for k, obj in enumerate(objects):
        said = [w for owner, (_, run) in zip(owners, places) if owner == k for w in run]
        if not said:
            continue
        phrase = " ".join(p for p in said if p != "center") or "center"  # "top center" = "top"
        if phrase not in POSITIONS or len(said) > 2:
            raise ValueError(f"caption {text!r}: unknown position {' '.join(said)!r} for the {SHAPES[obj.shape]}; "
                             f"positions: {', '.join(POSITIONS)}")
        obj.position = POSITIONS.index(phrase)


def _check_drawable(text, objects, relation):
    """A two-object caption whose positions contradict each other or its relation can never be drawn."""
    a, b = (o.position for o in objects)
    if a is not None and a == b:
        raise ValueError(f"caption {text!r} puts both objects at the {POSITIONS[a]}; a cell holds one object")
    cells = range(GRID * GRID)
    if relation and not any(relation in relations_between(ca, cb) for ca in cells for cb in cells
                            if ca != cb and a in (None, ca) and b in (None, cb)):
        raise ValueError(f"caption {text!r} contradicts itself: a {objects[0]} cannot be {relation} "
                         f"a {objects[1]}")


def prompt_from_labels(objects):
    """The full Prompt that a scene's label row (2, 4) satisfies (positions included, no relation)."""
    return Prompt([ObjectSpec(*map(int, row)) for row in objects.tolist() if row[0] >= 0], None)


def scenes_from_prompts(prompts, seed=0):
    """Real scenes that satisfy each prompt (str or Prompt); what the caption leaves open is drawn at
    random. A perfect generator: the ceiling every model's caption accuracy is compared with."""
    check_prompt_list(prompts)
    g = torch.Generator().manual_seed(check_seed(seed))
    pick = lambda k: int(torch.randint(k, (1,), generator=g))
    objects = torch.full((len(prompts), MAX_OBJECTS, 4), -1, dtype=torch.long)
    for n, prompt in enumerate(prompts):
        prompt = parse_caption(prompt) if isinstance(prompt, str) else prompt
        cells = [(a, b) for a in range(GRID * GRID) for b in range(GRID * GRID) if a != b
                 and (prompt.relation is None or prompt.relation in relations_between(a, b))]
        specs = prompt.objects
        fixed = [s.position for s in specs]
        cells = [c for c in cells if all(f is None or f == p for f, p in zip(fixed, c))] or None
        if cells is None:
            raise ValueError(f"prompt {n} asks for positions that cannot hold its relation: {prompt}")
        chosen = cells[pick(len(cells))]
        for k, spec in enumerate(specs):
            color = spec.color if spec.color is not None else pick(len(COLORS))
            size = spec.size if spec.size is not None else pick(len(SIZES))
            objects[n, k] = torch.tensor([spec.shape, color, size, chosen[k]])
    offsets = (torch.rand(len(prompts), MAX_OBJECTS, 2, generator=g) * 2 - 1) * JITTER
    captions = [p if isinstance(p, str) else str(p) for p in prompts]
    return Scenes(objects, offsets, captions)


TWIN_CHANGES = ("color", "shape", "size", "relation")   # what a two-object twin swaps between its objects


def twin_scenes(scenes, split="train", seed=0):
    """A hard negative for each scene: a twin that differs in exactly one thing, captioned with the same template.
    Two-object scenes swap their cells (the relation inverts; half of them) or one attribute between their objects
    (colours, shapes or sizes: the same words, bound the other way); one-object scenes change one attribute or the position.
    A contrastive batch that holds both a scene and its twin can only be solved by reading what tells them apart,
    the binding of words to objects included. Twins never leave their split's (shape, colour, size) triples."""
    if scenes.choices is None:
        raise ValueError("twin_scenes needs scenes made by sample_scenes (their caption choices are recorded)")
    allowed = set(_split_triples(split)[1].tolist()) if split != "holdout" else None
    g = torch.Generator().manual_seed(check_seed(seed))
    rand = torch.randint(1 << 30, (len(scenes), 2), generator=g).tolist()
    out = scenes.objects.clone()
    for n, (objs, (r0, r1)) in enumerate(zip(scenes.objects.tolist(), rand)):
        a, b = objs
        if b[0] >= 0 and a[:3] != b[:3]:   # two objects: swap one field between them, where it differs
            fields = [i for i in range(3) if a[i] != b[i]]    # TWIN_CHANGES: half of the twins swap the cells
            i = 3 if r0 % 2 or not fields else fields[(r0 // 2) % len(fields)]
            a[i], b[i] = b[i], a[i]
            if allowed is not None and {triple_id(*a[:3]), triple_id(*b[:3])} - allowed:
                a[i], b[i] = b[i], a[i]
                a[3], b[3] = b[3], a[3]       # a swap of cells keeps both triples
        else:   # one object, or two alike (swapping them changes nothing): another value of one field of the first
            sizes = (len(SHAPES), len(COLORS), len(SIZES), GRID * GRID)
            for k in range(len(sizes)):
                i = (r0 + k) % len(sizes)
                new = a.copy()
                new[i] = (a[i] + 1 + r1 % (sizes[i] - 1)) % sizes[i]
                if i == 3 and b[0] >= 0:
                    continue                  # moving one of two alike objects may leave the caption true
                if i == 3 or allowed is None or triple_id(*new[:3]) in allowed:
                    a = new
                    break
        out[n] = torch.tensor([a, b])
    captions = [_caption(o, c) for o, c in zip(out.tolist(), scenes.choices.tolist())]
    return Scenes(out, scenes.offsets.clone(), captions, scenes.choices.clone())


# ----------------------------------------------------------------------------- rendering

def _box_sdf(dx, dy, hx, hy):
    qx, qy = dx.abs() - hx, dy.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _shape_sdf(shape, dx, dy, r):
    """Signed distance (pixels, < 0 inside) to a shape of radius r centred at the origin; y points down."""
    if shape == 0:  # circle
        return torch.sqrt(dx ** 2 + dy ** 2) - r
    if shape == 1:  # square
        return _box_sdf(dx, dy, 0.85 * r, 0.85 * r)
    if shape == 2:  # triangle pointing up: the largest distance to its three edge lines
        h = 1.05 * r
        base = dy - 0.75 * h                                   # below the base
        left = (-dx * 0.866 - dy * 0.5) - 0.5 * h * 0.866      # two slanted edges, unit normals
        right = (dx * 0.866 - dy * 0.5) - 0.5 * h * 0.866
        return torch.maximum(base, torch.maximum(left, right))
    if shape == 3:  # diamond
        return (dx.abs() + dy.abs() - 1.05 * r) / math.sqrt(2)
    if shape == 4:  # cross: union of two bars
        return torch.minimum(_box_sdf(dx, dy, r, 0.33 * r), _box_sdf(dx, dy, 0.33 * r, r))
    raise ValueError(f"unknown shape id {shape}")


def object_alpha(objects, offsets, resolution, squash=None):
    """Coverage in [0, 1] of every object: (N, K, R, R). Absent objects (shape -1) cover nothing.
    squash (N, K, 2), optional: per-axis scale <= 1 of each object (the oracle's malformed shapes)."""
    n, k = objects.shape[:2]
    cell = resolution / GRID
    row, col = objects[..., 3].div(GRID, rounding_mode="floor"), objects[..., 3] % GRID
    cx = (col + 0.5 + offsets[..., 0]) * cell           # centres in pixels
    cy = (row + 0.5 + offsets[..., 1]) * cell
    radius = torch.tensor(SIZE_RADIUS)[objects[..., 2].clamp(min=0)] * cell
    grid = torch.arange(resolution, dtype=torch.float32) + 0.5   # pixel centres
    alpha = torch.zeros(n, k, resolution, resolution)
    for shape in range(len(SHAPES)):
        mask = objects[..., 0] == shape
        if not mask.any():
            continue
        dx = grid.view(1, 1, -1) - cx[mask].view(-1, 1, 1)
        dy = grid.view(1, -1, 1) - cy[mask].view(-1, 1, 1)
        if squash is None:
            sdf = _shape_sdf(shape, dx, dy, radius[mask].view(-1, 1, 1))
        else:  # sdf of the shape in squashed coordinates, rescaled to stay ~ a distance in pixels
            sx, sy = squash[mask][:, 0].view(-1, 1, 1), squash[mask][:, 1].view(-1, 1, 1)
            sdf = _shape_sdf(shape, dx / sx, dy / sy, radius[mask].view(-1, 1, 1)) * torch.minimum(sx, sy)
        alpha[mask] = (0.5 - sdf).clamp(0, 1)          # box-filtered coverage of a 1-pixel footprint
    return alpha


def composite(alpha, rgb, grayscale=False):
    """Paint objects (alpha (N,K,R,R), colours (N,K,3) in [0,1]) over black; returns [-1, 1] images."""
    image = torch.zeros(alpha.shape[0], 3, *alpha.shape[2:])
    for k in range(alpha.shape[1]):
        a = alpha[:, k, None]
        image = image * (1 - a) + rgb[:, k, :, None, None] * a
    if grayscale:
        image = (image * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return image * 2 - 1


def render(scenes, resolution=32, grayscale=False):
    """Draw Scenes as float images in [-1, 1]: (N, 3, R, R), or (N, 1, R, R) when grayscale."""
    if not isinstance(resolution, int) or resolution < 16:
        raise ValueError(f"resolution must be an int >= 16 (32 is the default, 64 for the upsampler); got {resolution!r}")
    objects = scenes.objects if isinstance(scenes, Scenes) else scenes
    offsets = scenes.offsets if isinstance(scenes, Scenes) else torch.zeros(*objects.shape[:2], 2)
    chunk = max(1, 2**21 // resolution**2)  # keep each step's tensors cache-sized: ~2x faster than one batch
    return torch.cat([composite(object_alpha(objects[i:i + chunk], offsets[i:i + chunk], resolution),
                                COLOR_RGB[objects[i:i + chunk, :, 1].clamp(min=0)], grayscale)
                      for i in range(0, len(objects), chunk)] or [torch.empty(0, 1 if grayscale else 3, resolution, resolution)])


# ----------------------------------------------------------------------------- torch Dataset

def check_images(images, channels=(1, 3), slack=1e-3, name="images"):
    """The image contract of the whole library: a float tensor (N, C, H, W), C in `channels`, values
    in [-1, 1] (up to `slack`). Returns it as float32 on the CPU; a clear error names any breach."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(images.shape)}"
                         + (" (a single image? use images[None])" if images.ndim == 3 else ""))
    if images.shape[1] not in channels:
        raise ValueError(f"{name} must have {' or '.join(map(str, channels))} channels (N, C, H, W), "
                         f"got C={images.shape[1]} in shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floats in [-1, 1], got dtype {images.dtype} "
                        "(for uint8 images use images.float() / 127.5 - 1)")
    images = images.detach().float().cpu()
    check_pixel_range(images, slack, name)
    return images


def check_pixel_range(images, slack=1e-3, name="images"):
    """Refuse NaN, inf and values outside [-1, 1] (up to `slack`) in a float tensor, on whatever device it is:
    one min and one max over the batch, cheap enough for every call of an encoder."""
    if images.numel():
        lo, hi = torch.stack([images.detach().min(), images.detach().max()]).float().tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contain NaN or inf")
        if lo < -1 - slack or hi > 1 + slack:
            hint = " (images in [0, 1]? use x * 2 - 1)" if lo >= 0 else " (clamp generator outputs)"
            if hi > 2:
                hint = " (images in 0-255? use x / 127.5 - 1)"
            raise ValueError(f"{name} must lie in [-1, 1], got min {lo:.3g} max {hi:.3g}{hint}")


def to_uint8(images):
    """[-1, 1] float images -> uint8 (4x smaller in memory, exact round trip of rendered pixels)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class ShapesDataset(Dataset):
    """`size` Shapes scenes held in memory as uint8. Items are dicts: image in [-1, 1], objects, caption.

    Item i is the same for every dataset size (each chunk of scenes has its own seed stream).
    `get_batch(indices)` returns a whole batch at once (the training loop uses it; no workers needed).
    """

    def __init__(self, size=10_000, split="train", seed=0, resolution=32, grayscale=False,
                 num_objects=None, p_two=0.5):
        size = _check_count(size, "size", "the number of images", minimum=1)
        self.split, self.resolution, self.grayscale = split, resolution, grayscale
        self.scenes = sample_scenes(size, split, seed, num_objects, p_two)
        objects, offsets, step = self.scenes.objects, self.scenes.offsets, 4096
        self.images = torch.cat([to_uint8(render(Scenes(objects[i:i + step], offsets[i:i + step], []),
                                                 resolution, grayscale)) for i in range(0, size, step)])

    def __len__(self):
        return len(self.images)

    def get_batch(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        return {"image": self.images[indices].float() / 127.5 - 1,
                "objects": self.scenes.objects[indices],
                "caption": [self.scenes.captions[i] for i in indices.tolist()]}

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a ShapesDataset of {len(self)} images")
        i = i % len(self)
        return {"image": self.images[i].float() / 127.5 - 1, "objects": self.scenes.objects[i],
                "caption": self.scenes.captions[i]}


class TwinShapesDataset(ShapesDataset):
    """ShapesDataset whose batches hold each scene next to its twin (twin_scenes): get_batch of B indices returns
    2B items, scene i at row 2i and its twin at row 2i + 1. Hard negatives for contrastive training (CLIP)."""

    def __init__(self, size=10_000, split="train", seed=0, resolution=32, num_objects=None, p_two=0.5):
        super().__init__(size, split, seed, resolution, False, num_objects, p_two)
        self.twins = twin_scenes(self.scenes, split, seed)
        self.twin_images = torch.cat([to_uint8(render(Scenes(self.twins.objects[i:i + 4096],
                                                             self.twins.offsets[i:i + 4096], []), resolution))
                                      for i in range(0, size, 4096)])

    def get_batch(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        images = torch.stack([self.images[indices], self.twin_images[indices]], 1).flatten(0, 1)
        objects = torch.stack([self.scenes.objects[indices], self.twins.objects[indices]], 1).flatten(0, 1)
        captions = [c for i in indices.tolist() for c in (self.scenes.captions[i], self.twins.captions[i])]
        return {"image": images.float() / 127.5 - 1, "objects": objects, "caption": captions}


def shapes_loader(batch_size=64, shuffle=True, seed=0, **dataset_kwargs):
    """A plain torch DataLoader over ShapesDataset (captions are collated into a list of strings)."""
    dataset = ShapesDataset(seed=seed, **dataset_kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def downsample(images, resolution):
    """Area-downsample images (e.g. 64 -> 32), the way an upsampler's low-resolution input is made."""
    return F.interpolate(images, size=(resolution, resolution), mode="area")
